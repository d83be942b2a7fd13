
import torch
import torchvision

from nada_core.faces.invert import project
from nada_core.faces.perceptual import LPIPS, load_lpips
from nada_core.models.tiny import tiny_generator
from nada_core.store import weights


def test_lpips_weight_files_load_with_their_real_layouts(tmp_path, monkeypatch):
    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path))
    assert load_lpips() is None  # VGG16 not downloaded: callers fall back
    lin = weights.get_asset("lpips-vgg-lin")
    assert lin.present  # shipped inside the lpips wheel
    lin_sd = torch.load(lin.path, map_location="cpu", weights_only=True)
    assert sorted(lin_sd) == [f"lin{i}.model.1.weight" for i in range(5)]
    torch.manual_seed(0)
    vgg = weights.get_asset("vgg16")
    vgg.path.parent.mkdir(parents=True)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), vgg.path)  # torchvision's key layout
    model = load_lpips()
    assert torch.equal(model.lin3, lin_sd["lin3.model.1.weight"])
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    d_same = model(x, x)
    d_small = model(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1))
    d_big = model(x, torch.rand(2, 3, 64, 64) * 2 - 1)
    assert d_same.abs().max() < 1e-6 and (d_small > 0).all() and (d_big > d_small).all()


def test_projector_uses_lpips_when_given():
    torch.manual_seed(0)
    G = tiny_generator()
    target = G.synthesis(G.to_w_plus(G.mapping(torch.randn(1, G.style_dim))))
    lp = LPIPS()  # random VGG: still a differentiable image distance, enough to check the wiring
    losses = []
    project(G, target.detach(), steps=15, lpips=lp, progress=lambda s, n, l: losses.append(l))
    assert losses[-1] < losses[0]
