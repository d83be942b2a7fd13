"""Adapt tab: type a style, watch the generator train live (progress, loss curve, layer heat map,
previews), then find the model in the library, download it, or go back to an earlier iteration."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from nada_core.adapt import Adapter, Recipe
from nada_core.checkpoints import export_rosinality, load_generator
from nada_core.images import from_pil, grid, to_pil
from nada_core.library import new_run_dir
from nada_core.sampling import latents_for_seeds, render

from .state import Studio
from .ui import banner, friendly, missing_panel

EXAMPLES = [["Photo", "Sketch"], ["Human", "Pixar character"], ["Dog", "Pig"], ["Photo", "Oil painting by Van Gogh"]]
PRESETS = {  # paper settings: styles train every layer; shape changes adapt ~2/3 of the slots with style mixing
    "Style": {"k": 0, "mixing": 0.0, "iterations": 300},
    "Shape": {"k": -1, "mixing": 0.9, "iterations": 200},
}


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def heatmap(slot_history: list[list[int]], n_latent: int, rows: int = 40) -> Image.Image:
    """Rows: recent steps (newest at the bottom); columns: W+ slots, coarse to fine; lit = trained."""
    recent = slot_history[-rows:]
    a = np.zeros((max(1, len(recent)), n_latent), dtype=np.uint8)
    for i, slots in enumerate(recent):
        a[i, slots] = 1
    img = np.stack([40 + 215 * a, 40 + 120 * a, 60 + 20 * a], -1).astype(np.uint8)
    return Image.fromarray(img).resize((n_latent * 24, max(1, len(recent)) * 8), Image.NEAREST)


def preview_grid(preview) -> Image.Image:
    """Source row over adapted row; tiles between 128 and 256 px so tiny and 1024 px models both read well."""
    src, adapted = preview
    return grid([to_pil(src), to_pil(adapted)], tile=max(128, min(256, src.shape[-1])))


def build(studio: Studio):
    banner(studio)
    missing_panel(studio, ("generator", "clip"), "training (a base generator and the CLIP models)")
    with gr.Row():
        base = gr.Dropdown([(studio.base_label(n), n) for n in studio.base_names()], value=studio.default_base(),
                           label="Base model", scale=2)
        preset = gr.Radio(["Style", "Shape", "Custom"], value="Style", label="Preset", scale=2)
    with gr.Row():
        source = gr.Textbox("Photo", label="Source (what the model makes now)", max_length=300)
        target = gr.Textbox("Sketch", label="Target (the new domain)", max_length=300)
    gr.Examples(EXAMPLES, [source, target], label="Examples")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            style_files = gr.File(label="Style images (optional: image-guided target instead of text)",
                                  file_count="multiple", file_types=["image"])
            source_files = gr.File(label="Source images (optional, with style images; default: samples of the base)",
                                   file_count="multiple", file_types=["image"])
        with gr.Row():
            iterations = gr.Slider(1, 2000, value=300, step=1, label="Iterations")
            batch = gr.Slider(1, 8, value=2, step=1, label="Batch")
            lr = gr.Number(0.002, label="Learning rate (Adam, x4/5 as in the paper)")
        with gr.Row():
            k = gr.Slider(0, 18, value=0, step=1, label="Layers (W+ slots) trained per step, 0 = all")
            layer_iters = gr.Slider(0, 5, value=1, step=1, label="Layer-selection iterations")
            mixing = gr.Slider(0, 1, value=0.0, step=0.05, label="Style-mixing probability")
        with gr.Row():
            clip_models = gr.CheckboxGroup(studio.clip_names(), value=studio.clip_names(), label="CLIP models")
            w1 = gr.Number(1.0, label=f"weight {studio.clip_names()[0]}")
            w2 = gr.Number(1.0, label=f"weight {studio.clip_names()[-1]}", visible=len(studio.clip_names()) > 1)
        with gr.Row():
            seed = gr.Number(0, label="Seed", precision=0)
            preview_every = gr.Slider(1, 100, value=10, step=1, label="Preview every N steps")
    with gr.Row():
        estimate = gr.Markdown(_estimate_text(studio, studio.default_base(), 2, studio.clip_names(), 300))
        measure = gr.Button("Measure one step", scale=0)
    with gr.Row():
        start = gr.Button("Start", variant="primary")
        stop = gr.Button("Stop", variant="stop")
        retry = gr.Button("Retry saving", visible=False)
    status = gr.Markdown("Ready.", elem_id="adapt-status")
    with gr.Row():
        preview = gr.Image(format="png", label="Preview: source (top) and adapted (bottom), same latents", type="pil",
                           elem_id="adapt-preview", interactive=False, height=360)
        with gr.Column():
            loss_plot = gr.LinePlot(x="step", y="loss", color="model", label="Loss", height=220)
            heat = gr.Image(format="png", label="Adaptive layer freezing: W+ slots trained (columns: coarse -> fine)",
                            type="pil", interactive=False)
    with gr.Row():
        files = gr.File(label="Download (our .safetensors and rosinality .pt)", file_count="multiple", interactive=False)
        with gr.Column():
            snapshot = gr.Slider(0, 1, value=0, step=1, label="Snapshot (go back to an earlier iteration)", interactive=True)
            snapshot_preview = gr.Image(format="png", label="Snapshot preview", type="pil", interactive=False)
            keep = gr.Button("Save this snapshot as a new library model")
    run_dir = gr.State("")
    library = gr.Gallery(format="png", label="Model library", columns=4, height=260, allow_preview=False)

    # ------------------------------------------------------------------ handlers
    def apply_preset(name):
        if name not in PRESETS:
            return gr.update(), gr.update(), gr.update()
        p = PRESETS[name]
        n_latent = 18
        k_value = 0 if p["k"] == 0 else round(n_latent * 2 / 3)
        return gr.update(value=k_value), gr.update(value=p["mixing"]), gr.update(value=p["iterations"])

    preset.change(apply_preset, preset, [k, mixing, iterations], api_visibility="private")

    @friendly
    def train(base_name, preset_name, src, tgt, style_paths, source_paths, iters, bsz, lr_value, k_value, sel_iters, mix,
              models, weight1, weight2, seed_value, every, request: gr.Request, progress=gr.Progress()):
        G = studio.base(base_name)
        names, model_weights = _clip_choice(studio, models, weight1, weight2)
        k_slots = int(k_value) or None
        if preset_name == "Shape":
            k_slots = round(G.n_latent * 2 / 3)
        if k_slots and k_slots > G.n_latent:
            k_slots = G.n_latent
        style_images = [from_pil(_open(p)) for p in (style_paths or [])]
        source_images = [from_pil(_open(p)) for p in (source_paths or [])] if style_images else []
        recipe = Recipe(source=src or "", target=tgt or "", iterations=int(iters), batch=int(bsz), lr=float(lr_value),
                        k=k_slots, auto_layer_iters=int(sel_iters), clip_models=names, clip_weights=model_weights,
                        mixing=float(mix), seed=int(seed_value or 0), preview_every=int(every),
                        snapshot_every=max(1, int(iters) // 10), style_images=[Path(p).name for p in style_paths or []],
                        source_images=[Path(p).name for p in source_paths or []] if style_images else [])
        recipe.validate(G.n_latent)
        clip = studio.clip(names, model_weights)
        out = new_run_dir(src or "style", tgt or "images", studio.library_root)
        adapter = Adapter(G, recipe, clip, studio.device, out, base_name, style_images=style_images or None,
                          source_images=source_images or None)
        run_id = studio.start_training(adapter, _session(request))
        losses, slots, last_grid, ended = [], [], None, False
        try:
            for ev in adapter.run():
                if ev.kind == "warning":
                    gr.Warning(ev.message)
                    continue
                if ev.kind == "step":
                    progress(ev.step / ev.total, desc=f"step {ev.step}/{ev.total}, ETA {_fmt(ev.eta)}")
                    losses += [{"step": ev.step, "loss": v, "model": m} for m, v in ev.losses.items()]
                    slots.append(ev.slots)
                    studio.seconds_per_step[(base_name, int(bsz), tuple(names))] = ev.sec_per_step
                    if ev.preview is not None:
                        last_grid = preview_grid(ev.preview)
                    text = (f"**Training** step {ev.step}/{ev.total} - loss {ev.loss:.4f} - "
                            f"{ev.sec_per_step:.2f} s/step - about {_fmt(ev.eta)} left")
                    yield (text, last_grid, pd.DataFrame(losses), heatmap(slots, G.n_latent), gr.update(), gr.update(),
                           str(out), gr.update())
                    continue
                # done, cancelled or error: the model lands in the library either way
                ended = True
                downloads = []
                if ev.preview is not None:
                    last_grid = preview_grid(ev.preview)
                try:
                    if ev.checkpoint:
                        last_grid.save(out / "thumb.png")
                        downloads = [ev.checkpoint, str(export_rosinality(adapter.G_train, out / f"{out.name}.pt"))]
                except OSError as e:
                    gr.Warning(f"the model is saved, but its thumbnail or .pt export failed ({e})")
                n_snap = len(adapter.snapshots())
                verdict = {"done": "Finished", "cancelled": "Stopped", "error": "Stopped by an error"}[ev.kind]
                text = f"**{verdict}.** {ev.message}." + (f" Saved to the library as **{out.name}**." if ev.checkpoint else "")
                if ev.kind == "error":
                    gr.Warning(ev.message)
                if adapter.save_error:  # disk full or similar: keep the trained model in memory for a retry
                    studio.unsaved[_session(request)] = adapter
                yield (text, last_grid, pd.DataFrame(losses), heatmap(slots, G.n_latent) if slots else None, downloads,
                       gr.update(maximum=max(1, n_snap), value=n_snap, interactive=n_snap > 0), str(out),
                       library_items(studio))
        finally:
            if not ended and adapter.step > 0:  # the browser went away mid-run: keep what was learned
                adapter._save_final_or_none()
            studio.finish_training(run_id)

    @friendly
    def retry_saving(request: gr.Request):
        adapter = studio.unsaved.get(_session(request))
        if adapter is None:
            return "Nothing is waiting to be saved.", gr.update(visible=False), gr.update()
        path = adapter.save(adapter.out_dir / "final.safetensors")  # raises a clear message if it fails again
        studio.unsaved.pop(_session(request), None)
        return f"**Saved** to the library: {path.parent.name}.", gr.update(visible=False), library_items(studio)

    @friendly
    def stop_training(request: gr.Request):
        if studio.cancel_training(_session(request)):
            return "Stopping after the current step; the model so far will be saved."
        return "Nothing of yours is training right now."

    @friendly
    def show_snapshot(index, folder):
        if not folder or not index:
            return None
        snaps = sorted((Path(folder) / "snapshots").glob("step_*.safetensors"))
        if not snaps:
            return None
        path = snaps[min(int(index), len(snaps)) - 1]
        G, info = load_generator(path, studio.device)
        base_G = studio.base(json.loads((Path(folder) / "recipe.json").read_text())["base"])
        w = latents_for_seeds(base_G, info["meta"]["recipe"]["preview_seeds"], 0.7)
        return grid(render([base_G, G], w), tile=max(128, min(256, G.size)))

    @friendly
    def keep_snapshot(index, folder):
        if not folder or not index:
            raise gr.Error("train a model first, then pick a snapshot")
        folder = Path(folder)
        snaps = sorted((folder / "snapshots").glob("step_*.safetensors"))
        path = snaps[min(int(index), len(snaps)) - 1]
        step = int(path.stem.split("_")[1])
        dest = Path(f"{folder}-step{step}")
        dest.mkdir(parents=True, exist_ok=False)
        shutil.copy(path, dest / "final.safetensors")
        shutil.copy(folder / "recipe.json", dest / "recipe.json")
        gr.Info(f"saved iteration {step} as {dest.name}")
        return library_items(studio)

    @friendly
    def measure_step(base_name, bsz, models, weight1, weight2, iters):
        """Time one real training step (a throwaway copy; nothing is saved) to predict the run's length."""
        names, model_weights = _clip_choice(studio, models, weight1, weight2)
        G = studio.base(base_name)
        probe = Adapter(G, Recipe(iterations=1, batch=int(bsz), clip_models=names, clip_weights=model_weights),
                        studio.clip(names, model_weights), studio.device)
        probe.train_step()  # warm-up: first calls allocate and pick kernels
        t = time.perf_counter()
        probe.train_step()
        studio.seconds_per_step[(base_name, int(bsz), tuple(names))] = time.perf_counter() - t
        return _estimate_text(studio, base_name, int(bsz), names, int(iters))

    def refresh_estimate(base_name, bsz, models, iters):
        return _estimate_text(studio, base_name, int(bsz), list(models or []), int(iters))

    measure.click(measure_step, [base, batch, clip_models, w1, w2, iterations], estimate, api_name="measure",
                  concurrency_limit=1, concurrency_id="training")
    for comp in (base, batch, clip_models, iterations):
        comp.change(refresh_estimate, [base, batch, clip_models, iterations], estimate, api_visibility="private")
    start.click(train, [base, preset, source, target, style_files, source_files, iterations, batch, lr, k, layer_iters, mixing,
                        clip_models, w1, w2, seed, preview_every],
                [status, preview, loss_plot, heat, files, snapshot, run_dir, library],
                api_name="train", concurrency_limit=1, concurrency_id="training")
    stop.click(stop_training, None, status, api_name="stop")
    retry.click(retry_saving, None, [status, retry, library], api_visibility="private")
    status.change(lambda text: gr.update(visible="saving failed" in (text or "")), status, retry,
                  api_visibility="private", show_progress="hidden")
    snapshot.release(show_snapshot, [snapshot, run_dir], snapshot_preview, api_name="snapshot")
    keep.click(keep_snapshot, [snapshot, run_dir], library, api_visibility="private")
    return library


def _clip_choice(studio: Studio, models, weight1, weight2) -> tuple[list[str], list[float]]:
    """The ticked CLIP models and their weights (the two weight boxes belong to the first and last model)."""
    names = list(models or [])
    if not names:
        raise gr.Error("choose at least one CLIP model")
    all_names = studio.clip_names()
    by_name = {all_names[0]: float(weight1), all_names[-1]: float(weight2)}
    return names, [by_name.get(n, 1.0) for n in names]


def _session(request: gr.Request | None) -> str:
    return request.session_hash if request else ""


def library_items(studio: Studio):
    items = []
    for e in studio.library():
        items.append((str(e.thumbnail) if e.thumbnail else _placeholder(), e.label))
    return items


def _placeholder() -> np.ndarray:
    return np.full((64, 64, 3), 200, dtype=np.uint8)


def _open(path) -> Image.Image:
    from nada_core.align import load_photo

    return load_photo(path)


def _estimate_text(studio: Studio, base_name: str, batch: int, models: list[str], iterations: int) -> str:
    sec = studio.seconds_per_step.get((base_name, batch, tuple(models)))
    where = "GPU" if studio.device.startswith("cuda") else studio.device.upper()
    if sec is None:
        return (f"Running on **{where}**. Press *Measure one step* for an estimate of the run's length "
                "(it is also measured on the first training step).")
    return f"Running on **{where}**: measured {sec:.2f} s/step here, so {iterations} steps take about {_fmt(sec * iterations)}."
