import torch

from nada_core.models.tiny import tiny_generator
from nada_core.training.freezing import layers_for_slots, preset_slots, select_slots, set_trainable


def test_selected_slots_are_the_top_k_by_mean_change():
    G = tiny_generator(size=64)
    w = G.to_w_plus(G.mapping(torch.randn(8, G.style_dim, generator=torch.Generator().manual_seed(0))))
    target = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    loss_fn = lambda img: (img - target).pow(2).mean()
    slots = select_slots(G, w, loss_fn, k=4, iters=2, lr=0.01)
    # recompute by hand: two SGD steps on W+, score each slot by mean |dW+|
    wh = w.clone().requires_grad_(True)
    for _ in range(2):
        (g,) = torch.autograd.grad(loss_fn(G.synthesis(wh)), [wh])
        wh = (wh - 0.01 * g).detach().requires_grad_(True)
    score = (wh.detach() - w).abs().mean(dim=(0, 2))
    assert slots == torch.topk(score, 4).indices.tolist()
    assert score[slots].min() >= score[[s for s in range(G.n_latent) if s not in slots]].max()
    assert all(p.grad is None for p in G.parameters())  # the selection pass leaves no weight gradients


def test_k_equal_to_all_slots_skips_the_pass():
    G = tiny_generator()
    calls = []
    slots = select_slots(G, torch.zeros(1, G.n_latent, G.style_dim), lambda img: calls.append(1), k=G.n_latent, iters=1)
    assert slots == list(range(G.n_latent)) and calls == []


def test_exactly_the_layers_of_the_chosen_slots_are_trainable():
    G = tiny_generator(size=64)  # 10 slots, convs 0..7
    table = G.slot_consumers()  # the generator's slot map, the one definition
    layers = layers_for_slots(G, [0, 3, 9, 4])
    convs = [n for s in [0, 3, 9, 4] for n in table[s] if not n.startswith("to_rgb")]
    assert layers == [G.get_submodule(n) for n in convs]
    assert layers == [G.conv1, G.convs[2], G.convs[3]]  # slot 9 feeds only the last ToRGB
    assert layers_for_slots(G, [1, 1, 2]) == [G.convs[0], G.convs[1]]  # slot 1's ToRGB stays out; no duplicates
    set_trainable(G, layers)
    trainable = {n.split(".conv.")[0].split(".noise")[0].split(".activate")[0] for n, p in G.named_parameters() if p.requires_grad}
    assert trainable == {"conv1", "convs.2", "convs.3"}
    assert not any(p.requires_grad for n, p in G.named_parameters() if n.startswith(("style.", "to_rgb")))


def test_presets():
    assert preset_slots("all", 18) == list(range(18))
    assert preset_slots("shape", 18) == list(range(12))
    assert preset_slots("texture", 14) == list(range(7, 14))
