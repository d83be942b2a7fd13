"""Load figures (issue 9): N concurrent gradio_client users sampling (/sample) and editing (/edit)
while one training (/train) runs, against the app launched in-process on the tiny models (default)
or an app already running at --url.

Prints, per endpoint, the median and max latency of a request (queue + render + download of the
returned images), the errors, the image responses checked (every returned file opened fully with
PIL and its size checked; truncated or undecodable ones counted), and the training speed in steps/s
alone (the same run, before the users start) and under the load.

By default every user asks for the SAME images (same model, same seeds) at the same moment: that is
the case in which Gradio writes every identical output to one cache path, and the one in which
truncated downloads were seen. --vary gives each user its own seeds (distinct images, distinct paths).

--pil (in-process only, an experiment) makes the app's handlers return PIL images again instead of the
files demo/ui.py's image_file writes once, atomically: Gradio then rewrites <cache>/<hash>/image.png in place for
every identical result, which reproduces the truncated downloads the app used to have.

Usage: python bench/load.py [--users 4] [--requests 10] [--tiny | --base NAME] [--url URL --model ID]
                            [--vary] [--pil] [--alone 10] [--keep] [--verbose]
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
WORK = Path(tempfile.mkdtemp(prefix="nada_load_"))
# a private Gradio cache, so files of other Gradio processes on this machine cannot interfere
os.environ.setdefault("GRADIO_TEMP_DIR", str(WORK / "gradio"))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

TOO_LITTLE = "Too little data for declared Content-Length"


# ---------------------------------------------------------------------------------------- the old behaviour
def return_pil_images() -> None:
    """Undo the app's fix in this process only: handlers hand Gradio PIL images again."""
    from demo import adapt_tab, edit_tab, sample_tab, selfie_tab

    for module in (adapt_tab, edit_tab, sample_tab, selfie_tab):
        module.image_file = lambda img, *a, **k: img


class ProtocolErrors(logging.Handler):
    """Counts the server's 'Too little data for declared Content-Length' (uvicorn logs it with a traceback)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + repr(record.exc_info[1])
        if TOO_LITTLE in text:
            self.count += 1


# ---------------------------------------------------------------------------------------- the app
def launch_in_process(tiny: bool):
    os.environ.setdefault("NADA_LIBRARY_DIR", str(WORK / "library"))
    from app import MAX_UPLOAD
    from demo.app import CSS, build_demo
    from demo.state import Studio
    from tests.app_server import free_port

    studio = Studio(device="cpu" if tiny else None, tiny=tiny)
    demo = build_demo(studio)
    demo.queue(default_concurrency_limit=2)  # as app.py
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=CSS,
                show_error=True, max_file_size=MAX_UPLOAD, allowed_paths=[str(studio.library_root)])
    return demo, studio, f"http://127.0.0.1:{port}/"


_API: dict[str, dict] = {}


def api_kwargs(url: str, api_name: str, wanted: dict[str, object]) -> dict:
    """Keyword arguments for an endpoint, its inputs found by their labels (a label equal to the key, or the
    key followed by a space and more words), so that inputs added to a tab later keep their defaults."""
    from gradio_client import Client

    if url not in _API:
        _API[url] = Client(url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
    params = _API[url][api_name]["parameters"]
    kwargs, used = {}, set()
    for p in params:
        label = p.get("label") or ""
        key = next((k for k in wanted if k not in used and (label == k or label.startswith(k + " "))), None)
        if key is not None:
            kwargs[p["parameter_name"]] = wanted[key]
            used.add(key)
        elif not p.get("parameter_has_default"):
            kwargs[p["parameter_name"]] = None
    if set(wanted) - used:
        sys.exit(f"{api_name}: no input labelled {sorted(set(wanted) - used)}")
    return kwargs


def train_kwargs(url: str, base: str, clip: list[str] | None, iterations: int, target: str) -> dict:
    wanted = {"Base model": base, "Target": target, "Iterations": iterations, "Style images": [],
              "Source images": []}
    if clip:
        wanted["CLIP models"] = clip
    return api_kwargs(url, "/train", wanted)


STEP = re.compile(r"step (\d+)/(\d+)")


class Training:
    """One /train job streamed in a thread; (time, step) of every progress message."""

    def __init__(self, url: str, kwargs: dict):
        from gradio_client import Client

        self.client = Client(url, verbose=False, download_files=False)
        self.steps: list[tuple[float, int]] = []
        self.final = ""
        self.error = None
        self.job = self.client.submit(api_name="/train", **kwargs)
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self):
        seen, deadline = 0, time.time() + 3600
        while time.time() < deadline:
            outs = self.job.outputs()
            now = time.perf_counter()
            for out in outs[seen:]:
                text = str(out[0]) if isinstance(out, (list, tuple)) else str(out)
                m = STEP.search(text)
                if m and "Training:" in text:
                    self.steps.append((now, int(m.group(1))))
                self.final = text
            seen = len(outs)
            if self.job.done() and seen == len(self.job.outputs()):
                break
            time.sleep(0.02)
        try:
            self.job.result(timeout=60)
        except Exception as e:  # noqa: BLE001 - a stopped run may end with a message
            self.error = e

    def rate(self, t0: float, t1: float) -> float | None:
        """Steps per second between t0 and t1 (first to last progress message in the window)."""
        inside = [(t, s) for t, s in self.steps if t0 <= t <= t1]
        if len(inside) < 2 or inside[-1][0] == inside[0][0]:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def rate_over(self, windows) -> float | None:
        """Steps per second over several windows together."""
        steps = seconds = 0.0
        for t0, t1 in windows:
            inside = [(t, s) for t, s in self.steps if t0 <= t <= t1]
            if len(inside) >= 2:
                steps += inside[-1][1] - inside[0][1]
                seconds += inside[-1][0] - inside[0][0]
        return steps / seconds if seconds else None

    def wait_steps(self, n: int, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.steps) >= n:
                return True
            if self.job.done():
                return False
            time.sleep(0.05)
        return False

    def stop(self):
        try:
            self.client.predict(api_name="/stop")
        except Exception:  # noqa: BLE001
            pass
        self.thread.join(timeout=120)


# ---------------------------------------------------------------------------------------- the users
def check_image(path) -> tuple[str, tuple | int | None, str | None]:
    """('ok', size, sha256 of the pixels) when the file opens fully with PIL and decodes;
    ('truncated', bytes in the file, None) when it is empty, cut short or undecodable."""
    try:
        with Image.open(path) as im:
            im.load()
            return "ok", im.size, hashlib.sha256(im.tobytes()).hexdigest()[:16]
    except Exception:  # noqa: BLE001 - truncated, empty or undecodable
        return "truncated", os.path.getsize(path), None


class User(threading.Thread):
    def __init__(self, index: int, url: str, args, calls: dict, start: threading.Barrier):
        super().__init__(daemon=True)
        self.index, self.url, self.args, self.calls, self.start_barrier = index, url, args, calls, start
        self.results: list[dict] = []   # endpoint, seconds, error, images: [(status, size or bytes, pixel hash)]

    def run(self):
        from gradio_client import Client

        client = Client(self.url, verbose=False, download_files=str(WORK / f"user{self.index}"))
        try:
            self.start_barrier.wait(timeout=300)
        except threading.BrokenBarrierError:
            pass
        for i in range(self.args.requests):
            endpoint = "sample" if i % 2 == 0 else "edit"
            t = time.perf_counter()
            row = {"endpoint": endpoint, "error": None, "images": []}
            try:
                out = client.predict(api_name=f"/{endpoint}", **self.calls[endpoint])
                paths = [out] if endpoint == "sample" else [item["image"] for item in out]
                row["images"] = [check_image(p) for p in paths]
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            row["seconds"] = time.perf_counter() - t
            self.results.append(row)


def user_calls(url: str, args, user: int, model_id: str, base: str) -> dict:
    """The /sample and /edit arguments of one user: the same for all, or (--vary) seeds of its own."""
    shift = user * 100 if args.vary else 0
    return {"sample": api_kwargs(url, "/sample", {"Adapted model": model_id,
                                                  "Seeds": f"{shift}-{shift + args.seeds - 1}"}),
            "edit": api_kwargs(url, "/edit", {"Base model": base, "Adapted models": [model_id], "Seed": 3 + shift})}


# ---------------------------------------------------------------------------------------- report
def expected_sizes(size: int | None, n_seeds: int) -> dict:
    if not size:
        return {}
    tile = max(128, min(512, size))
    shown = max(256, size)
    return {"sample": (n_seeds * tile + (n_seeds - 1) * 4, 2 * tile + 4), "edit": (shown, shown)}


def report(args, rows, training, t0, t1, alone_windows, protocol_errors, size):
    want = expected_sizes(size, args.seeds)
    print(f"\n{args.users} users x {args.requests} requests ({'distinct' if args.vary else 'identical'} images), "
          f"{'PIL images (the old behaviour)' if args.pil else 'the app as it is'}, load {t1 - t0:.1f} s")
    print(f"{'endpoint':8} {'requests':>8} {'median s':>9} {'max s':>7} {'errors':>6} {'images':>6} {'truncated':>9} "
          f"{'wrong size':>10} {'distinct':>8}")
    totals = {"images": 0, "truncated": 0, "errors": 0, "wrong": 0}
    for endpoint in ("sample", "edit"):
        mine = [r for r in rows if r["endpoint"] == endpoint]
        if not mine:
            continue
        lat = [r["seconds"] for r in mine]
        errors = [r for r in mine if r["error"]]
        imgs = [im for r in mine for im in r["images"]]
        bad = sum(s == "truncated" for s, _, _ in imgs)
        sizes = [sz for s, sz, _ in imgs if s == "ok"]
        target = want.get(endpoint) or (statistics.mode(sizes) if sizes else None)
        wrong = sum(sz != target for sz in sizes)
        distinct = len({h for s, _, h in imgs if s == "ok"})
        print(f"{endpoint:8} {len(mine):8d} {statistics.median(lat):9.2f} {max(lat):7.2f} {len(errors):6d} "
              f"{len(imgs):6d} {bad:9d} {wrong:10d} {distinct:8d}")
        for r in errors[:3]:
            print(f"    error: {r['error']}")
        if bad:
            print(f"    truncated files received, bytes: {sorted(n for s, n, _ in imgs if s == 'truncated')}")
        if distinct:
            print(f"    pixels sha256: {' '.join(sorted({h for s, _, h in imgs if s == 'ok'}))}")
        totals["images"] += len(imgs)
        totals["truncated"] += bad
        totals["errors"] += len(errors)
        totals["wrong"] += wrong
    before, after = (training.rate(*w) for w in alone_windows)
    alone = training.rate_over(alone_windows)
    loaded = training.rate(t0, t1)
    fmt = lambda v: f"{v:.2f}" if v else "n/a"  # noqa: E731
    print(f"training steps/s: alone {fmt(alone)} (before {fmt(before)}, after {fmt(after)}), under load {fmt(loaded)}"
          + (f" = {loaded / alone:.0%} of alone" if alone and loaded else ""))
    print(f"image responses: {totals['images']} checked, {totals['truncated']} truncated/undecodable, "
          f"{totals['wrong']} of a wrong size; request errors: {totals['errors']}")
    if protocol_errors is not None:
        print(f"server log '{TOO_LITTLE}': {protocol_errors.count}")
    if args.verbose:
        s0 = training.steps[0][0]
        print("training progress (s after step 1, step):", [(round(t - s0, 2), st) for t, st in training.steps])
        print(f"load window {t0 - s0:.2f}..{t1 - s0:.2f} s")
    return totals


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--requests", type=int, default=10, help="requests per user, alternately /sample and /edit")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", default=True, help="in-process app on the tiny models (default)")
    mode.add_argument("--base", default=None, help="base generator to train and edit (in-process: real weights)")
    ap.add_argument("--clip", default=None, help="CLIP models for the training, comma separated (default: the tab's)")
    ap.add_argument("--url", default=None, help="an app already running (then --model or a short training first)")
    ap.add_argument("--model", default=None, help="library model id to sample and edit (default: train one first)")
    ap.add_argument("--size", type=int, default=None, help="base resolution, to check image sizes with --url")
    ap.add_argument("--seeds", type=int, default=4, help="seeds per /sample request")
    ap.add_argument("--vary", action="store_true", help="each user its own seeds (distinct images)")
    ap.add_argument("--pil", action="store_true", help="return PIL images as the app used to (reproduces truncation)")
    ap.add_argument("--alone", type=float, default=10.0,
                    help="seconds the training runs alone before the users start, and again after they end")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (Gradio cache, downloads, library)")
    ap.add_argument("--verbose", action="store_true", help="print the training's progress times")
    ap.add_argument("--train-iters", type=int, default=100_000,
                    help="the load run's iterations (it is stopped after the load)")
    args = ap.parse_args()
    if args.users < 1 or args.requests < 1 or not 1 <= args.seeds <= 16:
        ap.error("--users and --requests must be >= 1, --seeds 1..16")
    base = args.base or "tiny"
    clip = args.clip.split(",") if args.clip else None

    demo, protocol_errors, size = None, None, args.size
    if args.url:
        if args.pil:
            ap.error("--pil changes the app in this process: only without --url")
        url = args.url if args.url.endswith("/") else args.url + "/"
    else:
        if args.pil:
            return_pil_images()
        demo, studio, url = launch_in_process(tiny=base == "tiny")
        protocol_errors = ProtocolErrors()  # after the launch: uvicorn's logging set-up replaces its loggers' handlers
        logging.getLogger("uvicorn.error").addHandler(protocol_errors)
        size = size or studio.base(base).size
    print(f"app {url}  work folder {WORK}")

    try:
        model_id = args.model
        if not model_id:
            t = time.perf_counter()
            prep = Training(url, train_kwargs(url, base, clip, 4, "Sketch"))
            prep.thread.join(timeout=1800)
            m = re.search(r"Saved as (?:\*\*|<b>)(.+?)(?:\*\*|</b>)", prep.final)
            if not m:
                sys.exit(f"the preparatory training did not save a model: {prep.error or prep.final[:300]}")
            model_id = m.group(1)
            print(f"model {model_id} trained in {time.perf_counter() - t:.1f} s")

        training = Training(url, train_kwargs(url, base, clip, args.train_iters, "Statue"))
        if not training.wait_steps(2, timeout=600):
            sys.exit(f"the load training did not start: {training.error or training.final[:300]}")
        a0 = training.steps[0][0]
        time.sleep(args.alone)
        alone_window = (a0, time.perf_counter())

        barrier = threading.Barrier(args.users + 1)
        users = [User(i, url, args, user_calls(url, args, i, model_id, base), barrier) for i in range(args.users)]
        for u in users:
            u.start()
        try:
            barrier.wait(timeout=300)
        except threading.BrokenBarrierError:
            print("warning: not every user connected within 5 minutes; the others started anyway")
        t0 = time.perf_counter()
        for u in users:
            u.join(timeout=1800)
        t1 = time.perf_counter()
        if training.job.done():
            print("warning: the training ended before the load did; steps/s under load covers only its part")
        time.sleep(args.alone)  # alone again after the load: the machine's other work may have changed meanwhile
        after_window = (t1, time.perf_counter())
        training.stop()
        totals = report(args, [r for u in users for r in u.results], training, t0, t1, (alone_window, after_window),
                        protocol_errors, size)
        if training.error:
            print(f"the stopped training's last update failed: {str(training.error).splitlines()[0][:160]}")
    finally:
        if demo is not None:
            demo.close()
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)
    sys.exit(1 if totals["truncated"] or totals["errors"] or totals["wrong"] else 0)


if __name__ == "__main__":
    main()
