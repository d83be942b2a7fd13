"""Correctness of the generator and one adaptation step on an accelerator (run before its benchmarks).

Compares, on the device: each formulation's image and weight gradients in float64 with the float64
transcription of the reference math (tests/reference_stylegan2.py); float32 (TF32 convolutions) and bf16
autocast images at 1024 px with that reference; and a few adaptation steps with the tiny CLIP in float32 and
bf16 (finite losses, G_train moves away from G_frozen, G_frozen unchanged). Prints relative errors
||a - ref|| / ||ref|| and exits non-zero when one is over its tolerance.

Usage: python bench/device_check.py [--device cuda]
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from nada_core.guidance.clip_guide import ClipMember  # noqa: E402
from nada_core.models import stylegan2  # noqa: E402
from nada_core.models.stylegan2 import Generator  # noqa: E402
from nada_core.models.tiny import tiny_clip  # noqa: E402
from nada_core.training.adapt import Adapter, Recipe  # noqa: E402
from tests.reference_stylegan2 import reference_synthesis  # noqa: E402

failures = []


def report(what, err, tol):
    ok = err <= tol
    print(f"  {what:60} {err:10.2e}  (tolerance {tol:.0e}) {'ok' if ok else 'FAILED'}")
    if not ok:
        failures.append(what)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def exact_float64(device):
    print("float64, 256 px, batch 2: image and weight gradients against the reference transcription")
    torch.manual_seed(0)
    G = Generator(256, channel_multiplier=1).double().to(device)
    ws = torch.randn(2, G.n_latent, 512, dtype=torch.float64, device=device)
    probe = torch.randn(2, 3, 256, 256, dtype=torch.float64, device=device)
    params = {k: v for k, v in G.named_parameters() if not k.startswith("style.")}  # synthesis only
    ref_img = reference_synthesis(params | dict(G.named_buffers()), ws)
    ref_grads = torch.autograd.grad((ref_img * probe).sum(), list(params.values()))
    for name in ("grouped", "scaled"):
        with stylegan2.formulation(device=name):
            img = G.synthesis(ws)
            grads = torch.autograd.grad((img * probe).sum(), list(params.values()))
        report(f"{name}: image", rel(img, ref_img), 1e-10)
        worst = max((rel(g, r), k) for g, r, k in zip(grads, ref_grads, params) if r.norm() > 0)
        report(f"{name}: worst weight gradient ({worst[1]})", worst[0], 1e-9)


def float32_1024(device):
    print("1024 px (config-f shape), batch 2: float32 and bf16 autocast against float64 on the same device")
    torch.manual_seed(1)
    G = Generator(1024, channel_multiplier=2).to(device)
    ws = torch.randn(2, G.n_latent, 512, device=device)
    with torch.no_grad():
        ref = reference_synthesis({k: v for k, v in G.state_dict().items()}, ws)
        for name in ("grouped", "scaled"):
            with stylegan2.formulation(device=name):
                report(f"{name}: float32 image", rel(G.synthesis(ws), ref), 1e-2)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    report(f"{name}: bf16 autocast image", rel(G.synthesis(ws), ref), 5e-2)


def adaptation(device):
    print("adaptation at 64 px with the tiny CLIP (random weights), 4 steps")
    for amp in ("off", "bf16"):
        torch.manual_seed(2)
        G = Generator(64, channel_multiplier=1).to(device)
        model, tok = tiny_clip()
        clip = [ClipMember("tiny", model.to(device), tok)]
        before = {k: v.clone() for k, v in G.state_dict().items()}
        ad = Adapter(G, Recipe(iterations=4, clip_models=["tiny"], clip_weights=[1.0], amp=amp, compile="off",
                               preview_every=10 ** 6), clip, device)
        losses = [float(sum(ad.train_step()[0].values())) for _ in range(4)]
        moved = max(float((p - ad.G_frozen.state_dict()[k]).abs().max())
                    for k, p in ad.G_train.state_dict().items() if p.is_floating_point())
        frozen_same = all(torch.equal(v, before[k]) for k, v in ad.G_frozen.state_dict().items())
        finite = all(torch.isfinite(torch.tensor(losses)))
        print(f"  amp={amp}: losses {', '.join(f'{x:.4f}' for x in losses)}; G_train moved up to {moved:.2e}; "
              f"G_frozen unchanged: {frozen_same}")
        if not (finite and moved > 0 and frozen_same):
            failures.append(f"adaptation amp={amp}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"device {device} ({name}), torch {torch.__version__}")
    exact_float64(device)
    float32_1024(device)
    adaptation(device)
    print("all checks passed" if not failures else f"FAILED: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
