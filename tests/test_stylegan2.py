import contextlib
import functools
import math
import shutil

import pytest
import torch

from nada_core.models.stylegan2 import Generator, ModulatedConv2d, Upsample, channel_table, seeds_to_z
from nada_core.models.tiny import tiny_generator
from tests.reference_stylegan2 import reference_mapping, reference_synthesis


def test_modulation_and_demodulation_by_hand():
    # 2 input channels, 1 output, 1x1 kernel: out = (a*s1*x1 + b*s2*x2) * c / sqrt((a*s1*c)^2 + (b*s2*c)^2 + 1e-8)
    conv = ModulatedConv2d(2, 1, 1, style_dim=3, demodulate=True)
    a, b, s1, s2, x1, x2 = 0.5, -2.0, 1.5, 0.25, 3.0, -1.0
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([a, b]).view(1, 1, 2, 1, 1))
        conv.modulation.weight.zero_()
        conv.modulation.bias.copy_(torch.tensor([s1, s2]))
    x = torch.tensor([x1, x2]).view(1, 2, 1, 1)
    c = 1 / math.sqrt(2)  # fan-in scale 1/sqrt(in*k*k)
    expected = (a * s1 * x1 + b * s2 * x2) * c / math.sqrt((a * s1 * c) ** 2 + (b * s2 * c) ** 2 + 1e-8)
    got = conv(x, torch.zeros(1, 3)).item()
    assert got == pytest.approx(expected, rel=1e-6)
    conv.demodulate = False
    assert conv(x, torch.zeros(1, 3)).item() == pytest.approx((a * s1 * x1 + b * s2 * x2) * c, rel=1e-6)


def test_skip_upsampling_of_an_impulse_by_hand():
    # upfirdn2d(up=2, pad=(2,1)) with [1,3,3,1] (x4 gain): 1-D response of a corner impulse is [.75, .75, .25, 0]
    up = Upsample((1, 3, 3, 1))
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1
    r = torch.tensor([0.75, 0.75, 0.25, 0.0])
    assert torch.allclose(up(x)[0, 0], r[:, None] * r[None, :], atol=1e-7)
    # interior of a constant image is preserved (the polyphase weights sum to one)
    assert torch.allclose(up(torch.ones(1, 1, 4, 4))[0, 0, 2:6, 2:6], torch.ones(4, 4), atol=1e-6)


def test_transposed_conv_upsampling_with_blur_by_hand():
    # centre tap only, demodulated to gain 1: a single pixel x becomes a 2x2 block of 0.75*0.75*x
    conv = ModulatedConv2d(1, 1, 3, style_dim=2, upsample=True)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 1, 1] = 3.0
        conv.modulation.weight.zero_()
        conv.modulation.bias.fill_(2.0)
    out = conv(torch.full((1, 1, 1, 1), 4.0), torch.zeros(1, 2))
    assert out.shape == (1, 1, 2, 2)
    assert torch.allclose(out, torch.full((1, 1, 2, 2), 0.5625 * 4.0), atol=1e-6)


def test_w_plus_slots_feed_the_documented_layers():
    G = tiny_generator(size=64)
    L = G.n_latent
    assert L == 10
    table = G.slot_consumers()
    assert table[0] == ["conv1"] and table[1] == ["to_rgb1", "convs.0"]
    assert table[3] == ["convs.2", "to_rgbs.0"] and table[L - 1] == ["to_rgbs.3"]
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, args[1].clone()))
             for name, m in G.named_modules() if type(m).__name__ in ("StyledConv", "ToRGB")]
    ws = torch.randn(2, L, G.style_dim)
    G.synthesis(ws)
    for h in hooks:
        h.remove()
    consumers = [name for names in table.values() for name in names]
    assert sorted(consumers) == sorted(seen)  # every layer reads exactly one slot
    for slot, names in table.items():
        for name in names:
            assert torch.equal(seen[name], ws[:, slot]), (slot, name)



@pytest.fixture
def use_formulation():
    """``use_formulation(**changes)``: the generator's formulation for the rest of the test (stylegan2.formulation)."""
    from nada_core.models.stylegan2 import formulation

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(formulation(**changes))

@pytest.mark.parametrize("one_kernel", [True, False], ids=["cpu-channels-last", "grouped-per-sample"])
@pytest.mark.parametrize("size,cm,cmax", [(32, 1, 32), (64, 2, 48)])
def test_synthesis_matches_reference_math(size, cm, cmax, one_kernel, use_formulation):
    use_formulation(cpu_channels_last=one_kernel)  # both code paths, same answer
    G = tiny_generator(size=size, channel_multiplier=cm, channel_max=cmax, style_dim=64)
    ws = torch.randn(2, G.n_latent, 64) * 0.5 + 0.3
    with torch.no_grad():  # the channels-last path serves inference
        ours = G.synthesis(ws, noise_mode="const")
    ref = reference_synthesis(G.state_dict(), ws)
    assert ours.shape == (2, 3, size, size)
    assert (ours.double() - ref).abs().max().item() <= 1e-4
    # the comparison has teeth: dropping the noise moves the image far beyond that tolerance
    with torch.no_grad():
        assert (G.synthesis(ws, noise_mode="none").double() - ref).abs().max().item() > 1e-3


CPU_TRAINING_FORMULATIONS = {  # cpu_training_layout, scale_ratio, BLOCK_DIAG_MAX_BATCH
    "mixed": (True, 1.0, 4),                 # the default: per layer, whichever moves less data
    "scaled-activations": (True, 0.0, 4),    # every layer shares one kernel across the batch
    "per-sample-cl": (True, math.inf, 4),    # every layer grouped per-sample kernels, channels-last
    "per-sample-bmm": (True, math.inf, 0),   # ... with ToRGB as a batched matrix product
    "grouped-nchw": (False, 1.0, 4),         # the formulation other devices use
}


@functools.lru_cache(maxsize=None)
def _reference_gradients(size, cm, cmax):
    """(generator, W+, probe, image, {name: gradient}, W+ gradient) of the float64 reference math, whose
    gradients come from autograd through tests/reference_stylegan2.py; computed once per model."""
    G = tiny_generator(size=size, channel_multiplier=cm, channel_max=cmax, style_dim=64)
    ws = torch.randn(2, G.n_latent, 64, generator=torch.Generator().manual_seed(size)) * 0.5 + 0.3
    sd = {k: v.detach().double().requires_grad_(v.is_floating_point()) for k, v in G.state_dict().items()}
    ws64 = ws.double().requires_grad_(True)
    ref = reference_synthesis(sd, ws64)
    probe = torch.linspace(-1, 1, ref.numel()).view_as(ref)  # a loss that weighs every pixel differently
    (ref * probe.double()).sum().backward()
    return G, ws, probe, ref.detach(), {k: v.grad for k, v in sd.items() if v.grad is not None}, ws64.grad


@pytest.mark.parametrize("formulation", list(CPU_TRAINING_FORMULATIONS))
@pytest.mark.parametrize("size,cm,cmax", [(32, 1, 32), (64, 2, 48)])
def test_training_forward_and_gradients_match_reference_math(size, cm, cmax, formulation, monkeypatch, use_formulation):
    """Under autograd (training) every CPU formulation gives the reference image to 1e-4 and the reference
    math's gradients for every synthesis weight and for W+. Gradient tolerances: a pre-activation that float32
    rounding puts on the other side of the leaky ReLU's kink changes its gradient by 80%; over 25 seeds that
    moved weight gradients by up to 3e-4 of their largest entry and the noise strengths (one number summed over
    whole maps) by up to 3e-2, the grouped NCHW formulation included; the bounds keep 5x and 3x margins."""
    layout, ratio, block_diag = CPU_TRAINING_FORMULATIONS[formulation]
    use_formulation(cpu_training_layout=layout, scale_ratio=ratio)
    monkeypatch.setattr("nada_core.models.stylegan2.BLOCK_DIAG_MAX_BATCH", block_diag)
    G, ws, probe, ref, ref_grads, ref_ws_grad = _reference_gradients(size, cm, cmax)
    G.zero_grad(set_to_none=True)
    ws = ws.clone().requires_grad_(True)
    with torch.enable_grad():
        G.requires_grad_(True)
        out = G.synthesis(ws, noise_mode="const")
        (out * probe).sum().backward()
    assert (out.detach().double() - ref).abs().max().item() <= 1e-4
    assert (ws.grad.double() - ref_ws_grad).abs().max().item() <= 1e-3 * ref_ws_grad.abs().max().item()
    trained = [(n, p) for n, p in G.named_parameters() if not n.startswith("style.")]
    assert trained and all(p.grad is not None for _, p in trained)
    for name, p in trained:
        expected = ref_grads[name]
        tol = 1e-1 if name.endswith("noise.weight") else 2e-3
        assert (p.grad.double() - expected).abs().max().item() <= tol * expected.abs().max().item(), name


def test_mapping_truncation_and_mixing():
    G = tiny_generator()
    z = seeds_to_z([1, 2], G.style_dim)
    w = G.mapping(z)
    assert torch.allclose(w.double(), reference_mapping(G.state_dict(), z, G.n_mlp), atol=1e-5)
    w_avg = G.mean_latent(512)
    assert w_avg.shape == (1, G.style_dim)
    img_t = G(z, truncation_psi=0.0, truncation_latent=w_avg)
    assert torch.allclose(img_t[0], img_t[1], atol=1e-6)  # psi=0: every sample is the average face
    mixed = G.mix(w[:1], w[1:], crossover=3)
    assert torch.equal(mixed[0, :3], w[0].expand(3, -1)) and torch.equal(mixed[0, 3:], w[1].expand(G.n_latent - 3, -1))
    assert torch.equal(seeds_to_z([7], 64), seeds_to_z([3, 7], 64)[1:])  # per-seed z, batch-independent


def test_noise_modes():
    G = tiny_generator()
    ws = G.to_w_plus(G.mapping(seeds_to_z([0], G.style_dim)))
    a, b = G.synthesis(ws, "const"), G.synthesis(ws, "const")
    assert torch.equal(a, b)
    torch.manual_seed(0)
    r1 = G.synthesis(ws, "random")
    assert (r1 - a).abs().max() > 1e-4
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(ws, "bogus")


def test_full_size_layout_matches_config_f():
    with torch.device("meta"):
        G = Generator(1024, 512, 8, channel_multiplier=2)
    sd = G.state_dict()
    assert G.n_latent == 18 and len(G.convs) == 16 and len(G.to_rgbs) == 8
    assert sd["input.input"].shape == (1, 512, 4, 4)
    assert sd["style.8.weight"].shape == (512, 512)
    assert sd["convs.15.conv.weight"].shape == (1, 32, 32, 3, 3)
    assert sd["convs.0.conv.blur.kernel"].shape == (4, 4)
    assert sd["to_rgbs.7.upsample.kernel"].shape == (4, 4)
    assert sd["convs.6.conv.modulation.weight"].shape == (512, 512)
    assert sd["noises.noise_16"].shape == (1, 1, 1024, 1024)
    assert "to_rgb1.upsample.kernel" not in sd
    assert channel_table(1)[256] == 64 and channel_table(2)[256] == 128


def test_low_resolution_preview_is_the_early_skip_image():
    G = tiny_generator(size=64)
    ws = G.to_w_plus(G.mapping(seeds_to_z([3], G.style_dim)))
    small = G.synthesis(ws, max_resolution=16)
    full = G.synthesis(ws)
    assert small.shape == (1, 3, 16, 16) and full.shape == (1, 3, 64, 64)
    # the preview is what the full image is built on: coarse colours agree far better than a random image's
    down = torch.nn.functional.avg_pool2d(full, 4)
    other = torch.nn.functional.avg_pool2d(G.synthesis(G.to_w_plus(G.mapping(seeds_to_z([99], G.style_dim)))), 4)
    assert (down - small).abs().mean() < (other - small).abs().mean()


def test_w_avg_is_cached_until_the_mapping_changes():
    G = tiny_generator()
    a = G.w_avg()
    assert G.w_avg() is a and torch.allclose(a, G.mean_latent(4096))
    G.load_state_dict(tiny_generator(seed=1).state_dict())  # new weights: the cache must not go stale
    assert not torch.allclose(G.w_avg(), a)


def test_one_kernel_path_is_differentiable_and_agrees(monkeypatch):
    """Training uses the grouped path; the one-kernel path still gives the same gradients when called."""
    from nada_core.models.stylegan2 import ModulatedConv2d

    torch.manual_seed(0)
    conv = ModulatedConv2d(8, 6, 3, 16, upsample=True)
    x, style = torch.randn(2, 8, 5, 5), torch.randn(2, 16)
    grads = []
    for fn in (lambda: conv(x, style, 1.4, torch.ones(6)), lambda: conv._forward_shared_kernel(x, style, 1.4, torch.ones(6))):
        conv.zero_grad(set_to_none=True)
        out = fn()
        out.square().mean().backward()
        grads.append((out.detach(), conv.weight.grad.clone(), conv.modulation.weight.grad.clone()))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_grouped_kernels_makes_inference_round_like_training():
    from nada_core.models.stylegan2 import grouped_kernels

    G = tiny_generator(size=64)
    ws = torch.randn(2, G.n_latent, G.style_dim)
    G.requires_grad_(True)
    trained = G.synthesis(ws).detach()            # autograd on: grouped per-sample kernels
    with torch.no_grad(), grouped_kernels():
        frozen = G.synthesis(ws)
    with torch.no_grad():
        fast = G.synthesis(ws)                     # CPU inference: channels-last, one kernel
    assert torch.equal(frozen, trained)
    assert torch.allclose(fast, trained, atol=1e-4)


def _layer_pair(seed=0):
    """An upsampling StyledConv feeding a ToRGB with a skip input: every op of the CPU training path
    (scaled-activation or per-sample layers, transposed convolution, blur, ToRGB matrix product, skip upsampling)."""
    from nada_core.models.stylegan2 import StyledConv, ToRGB

    torch.manual_seed(seed)
    conv, rgb = StyledConv(8, 8, 3, 16, upsample=True), ToRGB(8, 16)
    with torch.no_grad():
        conv.activate.bias.normal_()
        conv.noise.weight.fill_(0.1)
    x, s1, s2 = torch.randn(2, 8, 4, 4), torch.randn(2, 16), torch.randn(2, 16)
    noise, skip = torch.randn(2, 1, 8, 8), torch.randn(2, 3, 4, 4)

    def fn(x, s1, s2, noise, skip):
        return rgb(conv(x, s1, noise), s2, skip)

    return (conv, rgb), fn, (x, s1, s2, noise, skip)


def _forward_backward(modules, fn, inputs):
    for m in modules:
        m.zero_grad(set_to_none=True)
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [p.grad.clone() for m in modules for p in m.parameters() if p.grad is not None] + [t.grad for t in inputs[:3]]
    return out.detach(), grads


def _assert_same(a, b):
    """Outputs to 1e-4 (the reference tolerance), each gradient to 1e-4 of its largest entry."""
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert (out_a - out_b).abs().max().item() <= 1e-4
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert (ga - gb).abs().max().item() <= 1e-4 * gb.abs().max().item()


@pytest.mark.parametrize("scaled", [True, False], ids=["scaled-activations", "per-sample-cl"])
def test_compiled_generator_graph_matches_eager(scaled, use_formulation):
    """torch.compile captures the whole CPU training path in one graph (AOTAutograd traces forward and backward,
    the custom blur backward included); outputs and gradients equal the eager ones. The aot_eager backend runs
    the captured graphs without inductor's C++ build, which the next test does on the smallest shapes."""
    use_formulation(scale_ratio=0.0 if scaled else math.inf)
    torch._dynamo.reset()
    G = tiny_generator(size=32).requires_grad_(True)
    ws = torch.randn(2, G.n_latent, G.style_dim)
    fn = torch.compile(G.synthesis, backend="aot_eager", dynamic=False, fullgraph=True)
    eager = _forward_backward([G], lambda w: G.synthesis(w, noise_mode="const"), [ws])
    compiled = _forward_backward([G], lambda w: fn(w, noise_mode="const"), [ws])
    _assert_same(eager, compiled)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="inductor on CPU needs a C++ compiler")
def test_inductor_compiled_layers_match_eager(use_formulation):
    """The real compiler (inductor, C++ on CPU) on the smallest shapes (~30 s cold on 2 cores): an upsampling
    layer with per-sample kernels and a ToRGB with its skip, forward and backward, equal to eager within the
    reference tolerances."""
    use_formulation(scale_ratio=math.inf)
    torch._dynamo.reset()
    modules, fn, inputs = _layer_pair()
    eager = _forward_backward(modules, fn, inputs)
    compiled = _forward_backward(modules, torch.compile(fn, dynamic=False, fullgraph=True), inputs)
    _assert_same(eager, compiled)
