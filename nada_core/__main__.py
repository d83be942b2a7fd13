"""Command line: ``python -m nada_core weights|adapt|batch|sample|invert|video|mapper|export ...`` (``--help`` on each).

Each command (and each helper) imports the engine modules it needs at its top, not here: this module loads only
the standard library and ``training.timefmt``, so ``--help`` and the light commands (``weights``) start without
torch, open_clip or the other heavy packages."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import types
from pathlib import Path

from .training.timefmt import fmt_seconds


def _bar(done: int, total: int | None, extra: str = "") -> str:
    if not total:
        return f"\r{done >> 20} MiB {extra}"
    n = int(30 * done / total)
    return f"\r[{'#' * n}{'.' * (30 - n)}] {100 * done / total:5.1f}% {extra}"


# ---------------------------------------------------------------------------- weights
def cmd_weights(args) -> int:
    from .store import weights
    manifest = weights.load_manifest()
    if args.action == "list":
        print(f"weights folder: {weights.weights_dir()}")
        for row in weights.status_rows(manifest):
            size = f"{row['bytes'] / 2 ** 20:8.1f} MiB" if row["present"] else "   missing  "
            print(f"{row['name']:18} {row['kind']:10} {size}  {row['path']}")
        return 0
    if args.trust and not args.repair:
        print("--trust goes with verify --repair", file=sys.stderr)
        return 2
    if args.action == "verify" and args.repair:
        results = weights.repair(args.names or None, trust_unverified=args.trust, manifest=manifest,
                                 progress=lambda n, d, t: print(_bar(d, t, n), end="", file=sys.stderr, flush=True))
        if any(r not in ("ok", "unverified", "trusted") for _, r in results):
            print(file=sys.stderr)  # end the progress bar's line
        for name, result in results:
            print(f"{name:18} {result}")
        return 1 if any(r.startswith("failed") for _, r in results) else 0
    if args.action == "verify":
        fix = "  (no longer matches its pin or record: `weights verify --repair NAME` fetches it again)"
        hints = {"unverified": "  (nothing pinned or recorded, e.g. placed by hand: `weights verify --repair --trust "
                               "NAME` records its current hash)", "size mismatch": fix, "sha256 mismatch": fix}
        bad = 0
        for a in manifest.values():
            if (a.name in args.names) if args.names else a.present:
                state = weights.verify(a)
                bad += state.endswith("mismatch")
                print(f"{a.name:18} {state}{hints.get(state, '')}")
        return 1 if bad else 0
    names = list(args.names) + [a.name for a in manifest.values() if args.kind and a.kind == args.kind and a.url]
    if not names:
        print("name the assets to download, or --kind KIND (see `python -m nada_core weights list`)", file=sys.stderr)
        return 2
    for name in names:
        asset = weights.get_asset(name, manifest)
        print(f"{name}: {asset.url} -> {asset.path}")
        path = weights.download(asset, progress=lambda d, t: print(_bar(d, t), end="", file=sys.stderr, flush=True))
        print(f"\n{name}: {weights.verify(asset)} ({path})")
    return 0


# ---------------------------------------------------------------------------- adapt
def cmd_adapt(args) -> int:
    from .guidance.clip_guide import load_ensemble
    from .models.tiny import is_tiny
    from .store.images import from_pil
    from .store.library import default_device, load_base, new_run_dir
    from .training.adapt import Adapter, Recipe
    from .training.process import training_process
    from .training.run import Run, stop_on_ctrl_c

    device = args.device or default_device()
    # a resumed run keeps its own recipe: base, prompts, CLIP models, iterations (recipe options are ignored)
    saved, saved_base = Adapter.saved_recipe(args.resume) if args.resume else (None, "")
    G, base_name = load_base(args.base or saved_base or "ffhq", device)
    if saved:  # the directions were measured with these models: a resumed run keeps them
        clip_names, clip_weights = list(saved.clip_models), list(saved.clip_weights)
    else:
        clip_names = [c.strip() for c in (args.clip or "ViT-B-32,ViT-B-16").split(",") if c.strip()]
        clip_weights = [float(w) for w in args.clip_weights.split(",")] if args.clip_weights else [1.0] * len(clip_names)
    style_paths = args.style_images or (saved.style_images if saved else [])
    source_paths = args.source_images or (saved.source_images if saved and not args.style_images else [])
    style_images = [from_pil(_open_image(p)) for p in style_paths] or None
    source_images = [from_pil(_open_image(p)) for p in source_paths] or None
    if source_images and not style_images:
        raise ValueError("--source-images only make sense together with --style-images")
    clip = load_ensemble(clip_names, clip_weights, device)
    if args.resume:
        out = Path(args.resume)
        ad = Adapter.resume(out, G, clip, device, style_images=style_images, source_images=source_images,
                            compile=args.compile)
    else:
        recipe = Recipe(source=args.source, target=args.target or "", iterations=args.iters, batch=args.batch,
                        lr=args.lr, preset=args.preset, k=args.k, clip_models=clip_names, clip_weights=clip_weights,
                        mixing=args.mixing, seed=args.seed, preview_every=args.preview_every,
                        snapshot_every=args.snapshot_every, style_images=[str(p) for p in style_paths],
                        source_images=[str(p) for p in source_paths], compile=args.compile or "off",
                        amp=args.amp, parity=args.parity, auto_layer_iters=args.auto_layer_iters)
        out = Path(args.out) if args.out else new_run_dir(args.source, args.target or "style")
        try:
            ad = Adapter(G, recipe, clip, device, out, base_name, style_images=style_images, source_images=source_images)
        except BaseException:
            if not args.out:  # the folder made for this run stays empty: a refused recipe leaves nothing behind
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
    if not args.no_diagnostics:
        ad.add_observer(ad.diagnostics_observer(identity={"auto": "auto", "on": True, "off": False}[args.identity]))
    r = ad.recipe
    to = f"'{r.target}'" if not r.style_images else f"{len(r.style_images)} style image(s)"
    at = f"resuming at step {ad.step}, " if args.resume else ""
    print(f"adapting {base_name} on {device}: '{r.source}' -> {to}, {at}{r.iterations} steps, "
          f"CLIP {'+'.join(r.clip_models)}, output {out}", file=sys.stderr)
    if ad.compiled:
        print(f"torch.compile: {', '.join(ad.compiled)} (compiled during the first step, which takes minutes)",
              file=sys.stderr)
    if args.json:
        _print_json({"kind": "start", "step": ad.step, "total": r.iterations, "base": base_name, "device": str(device),
                     "out": str(out), "resumed": bool(args.resume), "recipe": r.to_dict()})
    run = Run(ad)
    with training_process(device, tiny=is_tiny(base_name)), stop_on_ctrl_c(run):
        last = run.run_here(_print_event_json if args.json else _show_event)  # also writes thumb.png
    if not args.json:
        print(file=sys.stderr)
    if last is None or last.kind == "error":
        print(f"error: {last.message if last else 'nothing ran'}", file=sys.stderr)
        return 1
    if last.save_error or not last.checkpoint:
        print(f"error: trained {last.step} steps but the final model could not be saved "
              f"({last.save_error or 'no file was written'})", file=sys.stderr)
        snaps = ad.snapshots()
        if snaps:
            print(f"the newest snapshot is {snaps[-1]}; `--resume {out}` continues from it", file=sys.stderr)
        return 1
    if not args.json:
        print(f"{last.message}: {last.checkpoint}")
    if last.kind == "cancelled":
        print(f"stopped by Ctrl-C; `python -m nada_core adapt --resume {out}` continues the run", file=sys.stderr)
        return 130
    return 0


def _print_json(record: dict) -> None:
    print(json.dumps(record, allow_nan=False), flush=True)


def _print_event_json(ev) -> None:
    """One JSON object per line on stdout (see ``training.Event.to_dict``)."""
    _print_json(ev.to_dict())


def _show_event(ev) -> None:
    if ev.kind == "warning":
        print(f"\nwarning: {ev.message}", file=sys.stderr)
    elif ev.kind == "step":
        print(_bar(ev.step, ev.total, f"step {ev.step}/{ev.total} loss {ev.loss:.4f} "
                                      f"{ev.sec_per_step:.2f}s/it ETA {fmt_seconds(ev.eta, clock=True)}"),
              end="", file=sys.stderr, flush=True)


def _open_image(path):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


# ---------------------------------------------------------------------------- batch
def cmd_batch(args) -> int:
    from .training.batch import batch_command

    return batch_command(args)


# ---------------------------------------------------------------------------- sample
def _model_file(text: str) -> Path:
    """``store.library.model_file``, or a message saying what a command takes."""
    from .store.library import model_file

    found = model_file(text)
    if found is None and Path(text).is_dir():
        raise ValueError(f"{text} holds no weights yet (no final weights and no snapshot)")
    if found is None:
        raise ValueError(f"no such file or model: {text} (give a model file, a run folder or a library model's id)")
    return found


def _recorded_base(model: Path) -> str | None:
    """The base a model file says it was adapted from (its metadata), if it says."""
    from .store.checkpoints import load_generator

    return (load_generator(model)[1].get("meta") or {}).get("source_model")


def cmd_sample(args) -> int:
    from .latent.sampling import latents_for_seeds, parse_seeds, render
    from .store.checkpoints import load_generator
    from .store.images import grid
    from .store.library import default_device, load_base

    device = args.device or default_device()
    seeds = parse_seeds(args.seeds, field="--seeds")
    args.model = str(_model_file(args.model))
    G, info = load_generator(args.model, device)
    base = args.base or info.get("meta", {}).get("source_model")
    if not base:
        raise ValueError(f"{args.model} does not say which base it was adapted from; pass --base")
    G_src, _ = load_base(base, device)
    if G_src.config != G.config:
        raise ValueError(f"the base {base} ({G_src.config['size']} px) does not match the model ({G.config['size']} px)")
    w = latents_for_seeds(G_src, seeds, args.truncation)
    rows = render([G_src, G], w, args.noise)
    if args.mapper:
        rows.append(render([G], _mapped_latents(args.mapper, args.mapper_strength, G, w, device), args.noise)[0])
    out = Path(args.out or Path(args.model).with_name("samples.png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(rows).save(out)
    mapped = f"; third row: edited by {args.mapper} at strength {args.mapper_strength}" if args.mapper else ""
    print(f"wrote {out} (top: {base}, bottom: {args.model}{mapped}; seeds {args.seeds})")
    return 0


def _mapped_latents(path, strength: float, G, w, device):
    """``w`` edited by a latent mapper: w + strength * 0.1 * mapper(w)."""
    import torch

    from .training.mapper import check_mapper_fits, load_mapper

    mapper, info = load_mapper(path, device)
    for note in check_mapper_fits(mapper, info, G):
        print(f"note: {note}", file=sys.stderr)
    with torch.no_grad():
        return mapper.edit(w.to(device), strength)


# ---------------------------------------------------------------------------- mapper
def cmd_mapper(args) -> int:
    from .faces.identity import identity_for
    from .guidance.clip_guide import load_ensemble
    from .models.tiny import is_tiny
    from .store.library import default_device, library_dir, load_base, new_run_dir
    from .store.runs import MAPPERS
    from .training.mapper import MapperRecipe, MapperTrainer
    from .training.process import training_process
    from .training.run import Run, stop_on_ctrl_c

    device = args.device or default_device()
    G, model_name = load_base(args.model, device)
    clip_names = [c.strip() for c in args.clip.split(",") if c.strip()]
    clip_weights = [float(w) for w in args.clip_weights.split(",")] if args.clip_weights else [1.0] * len(clip_names)
    recipe = MapperRecipe(text=args.text or "", iterations=args.steps, batch=args.batch, lr=args.lr,
                          coarse=not args.no_coarse, medium=not args.no_medium, fine=not args.no_fine,
                          bias_layout=args.bias_layout, clip_models=clip_names, clip_weights=clip_weights,
                          clip_lambda=args.clip_lambda, latent_l2_lambda=args.l2_lambda, norm_lambda=args.norm_lambda,
                          id_lambda=args.id_lambda, train_size=args.train_size, test_size=args.test_size,
                          seed=args.seed, preview_every=args.preview_every, snapshot_every=args.snapshot_every)
    if not args.resume:
        recipe.validate()  # before loading CLIP: a bad recipe is one clear line, at once
    clip = load_ensemble(clip_names, clip_weights, device)
    id_fn, id_note = identity_for(args.identity, args.arcface, model_name, device)
    if args.resume:
        trainer = MapperTrainer.resume(args.resume, G, clip, device, id_fn=id_fn)
        out = Path(args.resume)
    else:
        out = Path(args.out) if args.out else new_run_dir(Path(model_name).stem, args.text, library_dir() / MAPPERS)
        trainer = MapperTrainer(G, recipe, clip, device, out, model_name, id_fn=id_fn)
    print(f"training a mapper on {model_name} ({device}) for '{trainer.recipe.text}', {trainer.recipe.iterations} "
          f"steps, output {out}; {id_note}", file=sys.stderr)
    run = Run(trainer)
    with training_process(device, tiny=is_tiny(model_name)), stop_on_ctrl_c(run):
        last = run.run_here(_show_event)   # also writes thumb.png (before row above after row)
    print(file=sys.stderr)
    if last is None or last.kind == "error" or last.save_error:
        print(f"error: {last.message if last else 'nothing ran'}", file=sys.stderr)
        return 1
    print(f"{last.message}: {last.checkpoint}")
    if last.kind == "cancelled":
        print(f"stopped by Ctrl-C; `python -m nada_core mapper --resume {out}` continues it", file=sys.stderr)
        return 130
    return 0


# ---------------------------------------------------------------------------- invert
def crop_from_args(args):
    """The --crop-* options as the core's CropAdjust (which bounds them and says so in one line)."""
    from .faces.align import CropAdjust

    shift_x, shift_y = CropAdjust.parse_shift(args.crop_shift)
    return CropAdjust(scale=args.crop_scale, shift_x=shift_x, shift_y=shift_y, rotate=args.crop_rotate)


def cmd_invert(args) -> int:
    from .faces.selfie import stylize_group_photo, stylize_photo

    pipeline = stylize_group_photo if args.all_faces else stylize_photo
    if not 0 <= args.keep_colours <= 1:   # before the (slow) alignment and inversion
        raise ValueError(f"--keep-colours must be between 0 and 1, got {args.keep_colours}")
    crop = crop_from_args(args)
    model = _model_file(args.model) if args.model else None
    base = args.base or (_recorded_base(model) if model else None) or "ffhq"   # as sample: the model's own base
    result = pipeline(args.photo, [str(model)] if model else [], base=base, steps=args.steps,
                      device=args.device, encoder=args.encoder, keep_colours=args.keep_colours, crop=crop)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, img in result.images().items():
        img.save(out / f"{name}.png")
        print(out / f"{name}.png")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- video
def cmd_video(args) -> int:
    from .faces.selfie import encoder_for, perceptual_for
    from .faces.video import VideoStyliser, load_styles, output_paths, stylize_clip
    from .store.clips import ClipLimits, probe
    from .store.library import default_device
    from .training.run import stop_on_ctrl_c

    if not 0 <= args.keep_colours <= 1:   # before a model is loaded
        raise ValueError(f"--keep-colours must be between 0 and 1, got {args.keep_colours:g}")
    limits = ClipLimits(max_seconds=args.max_seconds, max_frames=args.max_frames, max_side=args.max_side)
    info = probe(args.clip, limits)   # refused here, before a model is loaded or a frame decoded
    device = args.device or default_device()
    G, base_name, styles = load_styles(args.style, args.base, device)
    enc = None
    if args.encoder != "none":
        enc, why = encoder_for(base_name, G, device)
        if why:
            print(f"note: {why}", file=sys.stderr)
    perceptual = perceptual_for(device)[0] if enc is None and args.loss == "auto" else {}
    styliser = VideoStyliser(G, styles, enc, steps=args.steps, first_steps=args.first_steps, perceptual=perceptual,
                             fps=float(info.fps), detect_every=args.detect_every, max_faces=args.max_faces,
                             keep_colours=args.keep_colours)
    outputs = output_paths(args.out, list(styles))
    print(f"{args.clip}: {info.frames} frames, {info.width} x {info.height}, {float(info.fps):.2f} fps, "
          f"{'sound: ' + info.audio if info.audio else 'no sound'}; inversion: {styliser.method}", file=sys.stderr)

    def show(p):
        print(_bar(p.done, p.total, f"frame {p.done}/{p.total} · {p.frames_per_second:.2f} frames/s · "
                                    f"{p.faces} face(s)"), end="", file=sys.stderr, flush=True)

    stop = threading.Event()
    with stop_on_ctrl_c(types.SimpleNamespace(stop=stop.set)):
        result = stylize_clip(args.clip, info, styliser, outputs, progress=show, stop=stop, limits=limits)
    print(file=sys.stderr)
    for path in result.outputs.values():
        print(path)
    print(result.message, file=sys.stderr)
    return 130 if result.cancelled else 0


# ---------------------------------------------------------------------------- check-prompt
def cmd_check_prompt(args) -> int:
    from .guidance.clip_guide import load_ensemble
    from .guidance.prompt_check import check_prompt
    from .store.library import default_device

    names = [c.strip() for c in args.clip.split(",") if c.strip()]
    members = load_ensemble(names, device=args.device or default_device())
    report = check_prompt(args.source, args.target, members, alternatives=not args.no_alternatives)
    print(report.to_json() if args.json else report.table())
    return 0


# ---------------------------------------------------------------------------- delta
def _delta_base(given: str | None, recorded: object, src: Path):
    """The base for ``delta``: the one given on the command line (a name or a file), else the one the file records,
    taken by name only ('tiny', a weights manifest name, a library model), never as a path inside the file."""
    from .store.library import load_base, load_named_base

    if given:
        return load_base(given)
    if not recorded:
        raise ValueError(f"{src} does not say which base it was made from; pass --base")
    try:
        return load_named_base(recorded)
    except ValueError as e:
        raise ValueError(f"{src}: {e}; pass --base") from None


def cmd_delta(args) -> int:
    from .store.checkpoints import load_generator, save_generator
    from .store.delta import SUFFIX, apply_delta, delta_info, export_delta

    src = Path(args.file)
    if args.action == "export":
        src = _model_file(args.file)      # a model file, a run folder or a library id
        G, info = load_generator(src)
        meta = dict(info.get("meta") or {})
        G_base, base_name = _delta_base(args.base, meta.get("source_model"), src)
        meta["source_model"] = base_name
        given = Path(args.file)
        out = Path(args.out or (given / f"{given.name}{SUFFIX}" if given.is_dir() else
                                src.with_name(src.name.split(".")[0] + SUFFIX)))
        export_delta(G, G_base, meta, out)
        full = sum(t.numel() * t.element_size() for t in G.state_dict().values())
        size = out.stat().st_size
        print(f"wrote {out}: {size / 2 ** 20:.2f} MiB, {100 * size / full:.1f}% of the full model's "
              f"{full / 2 ** 20:.1f} MiB ({delta_info(out)['tensors']} changed tensors; base {base_name})")
        return 0
    meta = delta_info(src)["meta"]   # checked: a JSON object (else "not a NADA delta: ...")
    G_base, base_name = _delta_base(args.base, meta.get("source_model"), src)
    G = apply_delta(src, G_base)
    out = Path(args.out or src.with_name(src.name.split(".")[0] + ".safetensors"))
    save_generator(G, out, meta)
    print(f"wrote {out} (base {base_name} + {src.name})")
    return 0


# ---------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from .models.export import export, onnx_difference
    from .store.library import load_model

    G, name = load_model(args.model)
    out = export(G, args.out, args.format, mapping=args.mapping)
    takes = f"z (B, {G.style_dim}) and truncation (1,)" if args.mapping else \
        f"ws (B, {G.n_latent}, {G.style_dim})"
    print(f"wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MiB, {args.format}): {name}, input {takes}, "
          f"output image (B, 3, {G.size}, {G.size}) in [-1, 1], the model's stored noise")
    if args.check and args.format == "onnx":
        print(f"onnxruntime vs PyTorch, batch 2: max |diff| {onnx_difference(G, out, mapping=args.mapping):.2e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nada_core", description="NADA Studio engine")
    sub = p.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("weights", help="list, download or verify pretrained files")
    w.add_argument("action", choices=["list", "download", "verify"])
    w.add_argument("names", nargs="*", help="assets to download or verify (default for verify: all present)")
    w.add_argument("--kind", default=None, help="with download: every asset of this kind (e.g. direction)")
    w.add_argument("--repair", action="store_true", help="with verify: fetch again files that no longer match their "
                   "pin or the record made when they were downloaded (and named missing ones)")
    w.add_argument("--trust", action="store_true", help="with verify --repair: record the current hash of files "
                   "that have neither pin nor record (placed by hand), so later changes are caught")
    w.set_defaults(fn=cmd_weights)

    a = sub.add_parser("adapt", help="adapt a generator to a text (or image) target")
    a.add_argument("--base", default=None, help="'ffhq' (the default: 256 px on CPU, 1024 on GPU), a manifest name, "
                                                "a file, or 'tiny'")
    a.add_argument("--source", default="photo")
    a.add_argument("--target", default="")
    a.add_argument("--style-images", nargs="*", help="image-guided target instead of --target")
    a.add_argument("--source-images", nargs="*", help="with --style-images: images of the source domain "
                                                       "(default: 16 samples of the base generator)")
    a.add_argument("--iters", type=int, default=300)
    a.add_argument("--batch", type=int, default=2)
    a.add_argument("--lr", type=float, default=0.002)
    a.add_argument("--preset", default="auto", choices=["auto", "all", "texture", "shape"])
    a.add_argument("--k", type=int, default=None, help="W+ slots trained per step (auto preset)")
    a.add_argument("--auto-layer-iters", type=int, default=1, help="SGD steps of the layer-selection pass (auto "
                                                                    "preset with --k); 0 turns layer selection off")
    a.add_argument("--parity", default="ours", choices=["ours", "official"],
                   help="which layers train: ours (the convolutions that read the chosen W+ slots) or official (what "
                        "rinongal/StyleGAN-nada's ZSSGAN trains: slot i -> [conv1, to_rgb1, *convs][i], constant input "
                        "with fixed presets; see README, Exactness)")
    a.add_argument("--mixing", type=float, default=0.0)
    a.add_argument("--clip", default=None, help="comma-separated open_clip names, or 'tiny' "
                                                "(default: ViT-B-32,ViT-B-16)")
    a.add_argument("--clip-weights", default=None)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--preview-every", type=int, default=50)
    a.add_argument("--snapshot-every", type=int, default=50)
    a.add_argument("--out", default=None, help="run folder (default: library/<source>-to-<target>)")
    a.add_argument("--resume", default=None, help="continue the run in this folder with its own recipe (base, "
                                                   "prompts, style images, CLIP models, iterations); recipe options "
                                                   "are ignored")
    a.add_argument("--json", action="store_true", help="one JSON object per line and event on stdout (step, total, "
                                                       "loss, losses, sec_per_step, eta, clip_score, diversity, "
                                                       "identity, collapse when measured, message, checkpoint, "
                                                       "save_error) instead of the progress bar")
    a.add_argument("--no-diagnostics", action="store_true", help="skip the directional score, diversity and "
                                                                 "identity measured on each preview")
    a.add_argument("--identity", default="auto", choices=["auto", "on", "off"],
                   help="face identity distance in the diagnostics (auto: when the previews show faces)")
    a.add_argument("--compile", default=None, choices=["off", "on"],
                   help="torch.compile the generators and CLIP image encoders (inductor): minutes of compiling before "
                        "the first step, faster steps after it on CUDA, so for long runs (default off; README: Speed). "
                        "Also applies with --resume (a speed setting; the run learns the same)")
    a.add_argument("--amp", default="off", choices=["off", "bf16"],
                   help="bfloat16 autocast for the generators and CLIP: less GPU memory, no faster (default off)")
    a.add_argument("--device", default=None)
    a.set_defaults(fn=cmd_adapt)

    b = sub.add_parser("batch", help="train a list of recipes from a TOML file, here or over a Ray cluster")
    b.add_argument("jobs", help="TOML file: optional [defaults] and one [[job]] table per model (see README)")
    b.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                   help="run the jobs on Ray: 'auto' joins the cluster of this machine, 'local' starts one here, "
                        "or HEAD:6379 (needs `pip install -r requirements-cluster.txt`)")
    b.add_argument("--cpus-per-job", type=int, default=1, help="with --ray: CPUs each job takes (one GPU each "
                                                                "when the cluster has GPUs)")
    b.add_argument("--ship-weights", action="store_true", help="with --ray: send the base and CLIP weights from "
                                                                "here through Ray's object store")
    b.add_argument("--library", default=None, help="where the models go (default: the app's library)")
    b.add_argument("--skip-existing", action="store_true", help="skip jobs whose model is already in the library")
    b.add_argument("--check", action="store_true", help="check the file and show the plan; train nothing")
    b.add_argument("--device", default=None, help="without --ray: cpu, cuda, mps (default: the best here)")
    b.set_defaults(fn=cmd_batch)

    s = sub.add_parser("sample", help="PNG grid: source row above adapted row, same latents")
    s.add_argument("--model", required=True)
    s.add_argument("--base", default=None, help="source generator (default: the one recorded in the model)")
    s.add_argument("--seeds", default="0-7")
    s.add_argument("--truncation", type=float, default=0.7)
    s.add_argument("--noise", default="const", choices=["const", "random", "none"])
    s.add_argument("--out", default=None)
    s.add_argument("--device", default=None)
    s.add_argument("--mapper", default=None, help="latent mapper (file or mapper run folder): adds a row of the "
                                                   "model's images edited by it")
    s.add_argument("--mapper-strength", type=float, default=1.0, help="w + strength * 0.1 * mapper(w)")
    s.set_defaults(fn=cmd_sample)

    m = sub.add_parser("mapper", help="train a latent mapper (StyleCLIP levels mapper) for a text edit")
    m.add_argument("--model", default="ffhq", help="generator to edit: 'ffhq', a manifest name, a file (e.g. an "
                                                   "adapted model), or 'tiny'")
    m.add_argument("--text", default="", help="the edit, e.g. 'a face with purple hair'")
    m.add_argument("--steps", type=int, default=10_000)
    m.add_argument("--batch", type=int, default=2)
    m.add_argument("--lr", type=float, default=0.5, help="Ranger learning rate")
    m.add_argument("--no-coarse", action="store_true", help="switch off the coarse mapper (W+ slots 0-3)")
    m.add_argument("--no-medium", action="store_true", help="switch off the medium mapper (slots 4-7)")
    m.add_argument("--no-fine", action="store_true", help="switch off the fine mapper (slots 8-)")
    m.add_argument("--bias-layout", default="channel", choices=["channel", "cuda"],
                   help="'cuda' reproduces the official CUDA kernel's bias indexing")
    m.add_argument("--clip", default="ViT-B-32,ViT-B-16", help="comma-separated open_clip names, or 'tiny'")
    m.add_argument("--clip-weights", default=None)
    m.add_argument("--clip-lambda", type=float, default=1.0)
    m.add_argument("--l2-lambda", type=float, default=0.8, help="latent L2 weight")
    m.add_argument("--norm-lambda", type=float, default=0.5, help="CLIP embedding-norm weight")
    m.add_argument("--id-lambda", type=float, default=0.1, help="identity weight")
    m.add_argument("--identity", default="auto", choices=["auto", "arcface", "dlib", "off"])
    m.add_argument("--arcface", default=None, help="ArcFace IR-SE-50 weights (model_ir_se50.pth) for the identity loss")
    m.add_argument("--train-size", type=int, default=5000)
    m.add_argument("--test-size", type=int, default=1000)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--preview-every", type=int, default=100)
    m.add_argument("--snapshot-every", type=int, default=1000)
    m.add_argument("--out", default=None, help="run folder (default: library/mappers/<model>-to-<text>)")
    m.add_argument("--resume", default=None, help="continue the mapper run in this folder")
    m.add_argument("--device", default=None)
    m.set_defaults(fn=cmd_mapper)

    v = sub.add_parser("invert", help="align a face photo, invert it, stylise it and paste it back")
    v.add_argument("photo")
    v.add_argument("--model", default=None, help="adapted model to stylise with: a file, a run folder or a library id")
    v.add_argument("--base", default=None, help="the base to invert into (default: the model's own, else ffhq)")
    v.add_argument("--encoder", default="auto", choices=["auto", "e4e", "none"])
    v.add_argument("--steps", type=int, default=200, help="optimisation steps (0: encoder only)")
    v.add_argument("--out", default="out")
    v.add_argument("--device", default=None)
    v.add_argument("--all-faces", action="store_true",
                   help="stylise every face in the photo (up to 8, largest first) and paste them all back")
    v.add_argument("--keep-colours", type=float, nargs="?", const=1.0, default=0.0, metavar="STRENGTH",
                   help="give the stylised faces the photo's colours (its chroma; the style's light and shade stay): "
                        "1 (the default when given) = the photo's, 0 = the style's")
    v.add_argument("--crop-scale", type=float, default=1.0, help="the FFHQ crop's side times this, about its "
                   "centre (0.6-1.6; 1 = the FFHQ crop)")
    v.add_argument("--crop-shift", default="0,0", metavar="DX,DY", help="move the crop right/down by fractions of "
                   "its side (each -0.3 to 0.3), e.g. 0.02,-0.03")
    v.add_argument("--crop-rotate", type=float, default=0.0, metavar="DEGREES", help="turn the crop clockwise "
                   "(-45 to 45)")
    v.set_defaults(fn=cmd_invert)

    vid = sub.add_parser("video", help="stylise the faces of a video clip (sound kept), one MP4 per style")
    vid.add_argument("clip", help="the input clip (MP4, MOV, WebM, ...)")
    vid.add_argument("--style", action="append", required=True, help="a library model id or a weights file; "
                                                                      "repeat for several (one base)")
    vid.add_argument("--out", required=True, help="OUT.mp4 (several styles: OUT-<style>.mp4)")
    vid.add_argument("--base", default=None, help="the styles' base (default: the one they record; 'tiny' allowed)")
    vid.add_argument("--encoder", default="auto", choices=["auto", "none"],
                     help="auto: the e4e encoder where it fits the base and is downloaded, else optimisation")
    vid.add_argument("--steps", type=int, default=5, help="optimisation steps a frame, from the previous code")
    vid.add_argument("--first-steps", type=int, default=50, help="optimisation steps for a face seen the first time")
    vid.add_argument("--loss", default="auto", choices=["auto", "pixels"],
                     help="optimisation loss: auto (LPIPS, else CLIP + pixels, when downloaded) or pixels only")
    vid.add_argument("--detect-every", type=int, default=5, help="run the face detector every N frames")
    vid.add_argument("--max-faces", type=int, default=4)
    vid.add_argument("--max-seconds", type=float, default=60.0)
    vid.add_argument("--max-frames", type=int, default=1800)
    vid.add_argument("--max-side", type=int, default=1920, help="longest picture side allowed, in pixels")
    vid.add_argument("--keep-colours", type=float, nargs="?", const=1.0, default=0.0, metavar="STRENGTH",
                     help="the faces keep the clip's colours (its chroma) by this strength (1 when given alone)")
    vid.add_argument("--device", default=None)
    vid.set_defaults(fn=cmd_video)

    c = sub.add_parser("check-prompt", help="measure a source -> target prompt on the CLIP models before training")
    c.add_argument("--source", default="photo")
    c.add_argument("--target", required=True)
    c.add_argument("--clip", default="ViT-B-32,ViT-B-16", help="comma-separated open_clip names, or 'tiny'")
    c.add_argument("--no-alternatives", action="store_true", help="skip measuring rewordings")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--device", default=None)
    c.set_defaults(fn=cmd_check_prompt)

    d = sub.add_parser("delta", help="export a style as its difference from the base, or apply one")
    d.add_argument("action", choices=["export", "apply"])
    d.add_argument("file", help="export: the adapted model (a file, a run folder or a library id); apply: the "
                                ".nada.safetensors delta")
    d.add_argument("--base", default=None, help="the base model: a name, a file, or 'tiny' (default: the one the file "
                                                "records, looked up by name only: 'tiny', a weights manifest name or a "
                                                "library model)")
    d.add_argument("--out", default=None, help="export: F.nada.safetensors; apply: MODEL.safetensors")
    d.set_defaults(fn=cmd_delta)

    e = sub.add_parser("export", help="write a model as ONNX (or TorchScript) to run it without this project")
    e.add_argument("model", help="a model file, a library model's id, or a base ('ffhq', a manifest name, 'tiny')")
    e.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    e.add_argument("--out", required=True, help="the file to write, e.g. sketch.onnx")
    e.add_argument("--mapping", action="store_true", help="include the mapping network and truncation: inputs z and "
                                                          "truncation instead of W+")
    e.add_argument("--check", action="store_true", help="onnx: run the file with onnxruntime and print its largest "
                                                        "difference from PyTorch")
    e.set_defaults(fn=cmd_export)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as e:  # user-facing errors: one clear line, no trace
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
