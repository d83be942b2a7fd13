"""ONNX / TorchScript export: the files reproduce PyTorch's images at any batch size, noise included."""
import numpy as np
import pytest
import torch

from nada_core.__main__ import main
from nada_core.models.export import export_onnx, export_torchscript
from nada_core.models.tiny import tiny_generator

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

FFHQ_256 = {"size": 256, "style_dim": 512, "n_mlp": 8, "channel_multiplier": 2, "channel_max": 512}
TOLERANCE = 1e-3   # float32, [-1, 1] images


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def w_plus(G, batch, seed):
    z = torch.randn(batch, G.style_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return G.to_w_plus(G.mapping(z))


@pytest.fixture(scope="module", params=["tiny", "ffhq-256 layout"])
def exported(request, tmp_path_factory):
    G = tiny_generator(seed=3) if request.param == "tiny" else tiny_generator(seed=3, **FFHQ_256)
    path = export_onnx(G, tmp_path_factory.mktemp("onnx") / "g.onnx")
    return request.param, G, path


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_synthesis_matches_pytorch(exported, batch):
    name, G, path = exported
    ws = w_plus(G, batch, seed=batch)
    (out,) = session(path).run(None, {"ws": ws.numpy()})
    with torch.no_grad():
        ref = G.synthesis(ws, noise_mode="const").numpy()
        no_noise = G.synthesis(ws, noise_mode="none").numpy()
    diff = float(np.abs(out - ref).max())
    assert out.shape == (batch, 3, G.size, G.size)
    assert diff <= TOLERANCE, f"{name}, batch {batch}: max |onnxruntime - PyTorch| = {diff:.3g}"
    # the stored noise is in the file: without it the image differs far more than the tolerance
    assert float(np.abs(out - no_noise).max()) > 100 * max(diff, 1e-6), f"{name}: noise missing (diff {diff:.3g})"
    print(f"{name} batch {batch}: max |diff| {diff:.3g}")


def test_onnx_kernels_are_constants_and_the_batch_is_free(exported):
    _, G, path = exported
    model = onnx.load(str(path))
    constants = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    # one per layer, plus the blur of each upsampling layer and the RGB skip's upsampling per resolution
    n_up = len(G.to_rgbs)
    assert len(convs) == 2 + len(G.convs) + n_up + 2 * n_up
    assert all(n.input[1] in constants for n in convs), "a convolution's kernel is computed in the graph"
    dim = model.graph.input[0].type.tensor_type.shape.dim
    assert dim[0].dim_param and [d.dim_value for d in dim[1:]] == [G.n_latent, G.style_dim]


def test_onnx_with_mapping_matches_g_of_z(tmp_path):
    G = tiny_generator(seed=5)
    path = export_onnx(G, tmp_path / "z.onnx", mapping=True)
    s = session(path)
    for batch, psi in [(1, 0.7), (3, 1.0)]:
        z = torch.randn(batch, G.style_dim, generator=torch.Generator().manual_seed(batch))
        (out,) = s.run(None, {"z": z.numpy(), "truncation": np.array([psi], np.float32)})
        with torch.no_grad():
            ref = G(z, truncation_psi=psi).numpy()
        diff = float(np.abs(out - ref).max())
        assert diff <= TOLERANCE, f"mapping, batch {batch}, psi {psi}: max |onnxruntime - PyTorch| = {diff:.3g}"


def test_export_leaves_the_generator_as_it_was(tmp_path):
    G = tiny_generator(seed=2).double()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    export_torchscript(G, tmp_path / "g.pt")
    assert all(v.dtype == torch.float64 and torch.equal(v, before[k]) for k, v in G.state_dict().items())


JIT_DEPRECATED = "ignore:`torch.jit.load` is deprecated:FutureWarning"   # torch 2.14; it still works


@pytest.mark.filterwarnings(JIT_DEPRECATED)
def test_torchscript_matches_pytorch_at_any_batch(tmp_path):
    G = tiny_generator(seed=1)
    m = torch.jit.load(str(export_torchscript(G, tmp_path / "g.pt")))
    for batch in (1, 3):
        ws = w_plus(G, batch, seed=batch)
        with torch.no_grad():
            diff = float((m(ws) - G.synthesis(ws)).abs().max())
        assert diff <= TOLERANCE, f"TorchScript, batch {batch}: max |diff| = {diff:.3g}"


@pytest.mark.filterwarnings(JIT_DEPRECATED)
def test_cli_exports_a_library_model_by_id(tmp_path, capsys, monkeypatch):
    from nada_core.store.library import add_model

    monkeypatch.setenv("NADA_LIBRARY_DIR", str(tmp_path / "lib"))
    G = tiny_generator(seed=7)
    add_model(tmp_path / "lib", "pencil sketch", G, "tiny", {"source": "photo", "target": "sketch"})
    assert main(["export", "pencil-sketch", "--out", str(tmp_path / "s.onnx"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "input ws (B, 8, 64)" in out and "max |diff|" in out
    diff = float(out.rsplit("max |diff| ", 1)[1])
    assert diff <= TOLERANCE
    ws = w_plus(G, 2, seed=0)
    (img,) = session(tmp_path / "s.onnx").run(None, {"ws": ws.numpy()})
    with torch.no_grad():   # the library model's weights, not the base's
        assert np.abs(img - G.synthesis(ws).numpy()).max() <= TOLERANCE
        assert np.abs(img - tiny_generator().synthesis(ws).numpy()).max() > 0.1
    # a model file, as TorchScript
    assert main(["export", str(tmp_path / "lib" / "pencil-sketch" / "final.safetensors"), "--format", "torchscript",
                 "--out", str(tmp_path / "s.pt")]) == 0
    with torch.no_grad():
        assert float((torch.jit.load(str(tmp_path / "s.pt"))(ws) - G.synthesis(ws)).abs().max()) <= TOLERANCE
    assert main(["export", "no-such-model", "--out", str(tmp_path / "x.onnx")]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
