"""Size of a style delta against the full model file, for a config-f-sized generator (random weights,
real shapes): `python bench/delta_size.py [--size 1024 --channel-multiplier 2]`.

Which tensors differ depends on the run: the README's command (--auto_layer_k 18) and our 'auto'
preset with every slot train all synthesis convolutions (ToRGB layers, the constant input and the
mapping network stay as they were); 'texture' and 'shape' train fixed subsets.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nada_core.models.stylegan2 import Generator  # noqa: E402
from nada_core.store.checkpoints import save_generator  # noqa: E402
from nada_core.store.delta import export_delta  # noqa: E402
from nada_core.training.freezing import layers_for_slots, preset_slots  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--channel-multiplier", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = Generator(args.size, channel_multiplier=args.channel_multiplier).eval()
    with tempfile.TemporaryDirectory() as tmp:
        full = save_generator(base, Path(tmp) / "full.safetensors").stat().st_size
        print(f"{args.size} px, channel multiplier {args.channel_multiplier}: full model file {full / 2 ** 20:.1f} MiB (float32)")
        scenarios = {
            "all slots (README command, auto k=18)": list(range(base.n_latent)),
            "shape preset (coarse 2/3 of slots)": preset_slots("shape", base.n_latent),
            "texture preset (fine half of slots)": preset_slots("texture", base.n_latent),
            "3 coarse slots": [0, 1, 2],
        }
        for label, slots in scenarios.items():
            G = copy.deepcopy(base)
            with torch.no_grad():
                for layer in layers_for_slots(G, slots):
                    for p in layer.parameters():
                        p.add_(1e-3 * torch.randn_like(p))
            size = export_delta(G, base, {}, Path(tmp) / "d.nada.safetensors").stat().st_size
            print(f"  {label:40} delta {size / 2 ** 20:7.1f} MiB = {size / full:6.1%} of the full file")
            del G


if __name__ == "__main__":
    main()
