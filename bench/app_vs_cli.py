"""Training speed in the app against the CLI for the same tiny recipe: steps per second over the steady part
of a run (after the first 10% of its steps), both on this machine, one after the other.

    python bench/app_vs_cli.py [--iters 600] [--repeats 2]

The app is the real server (tiny models, in this process) driven by gradio_client in another process, as a
page is: the run streams its progress to the client while it trains. The CLI is `python -m nada_core adapt --json` in a
subprocess; each step's time is when its JSON line arrives."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def steady_rate(samples: list[tuple[float, int]], total: int) -> float:
    """Steps per second between the first sample past 10% of the run and the last one."""
    late = [(t, s) for t, s in samples if s >= total // 10]
    (t0, s0), (t1, s1) = late[0], late[-1]
    return (s1 - s0) / (t1 - t0)


def cli_rate(iters: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "nada_core", "adapt", "--base", "tiny", "--clip", "tiny", "--source", "Photo",
           "--target", "Sketch", "--iters", str(iters), "--batch", "2", "--preset", "all", "--snapshot-every", str(max(1, iters // 10)),
           "--preview-every", str(max(1, iters // 10)), "--json", "--out", str(out)]
    samples = []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            ev = json.loads(line)
            if ev.get("kind") == "step":
                samples.append((time.monotonic(), ev["step"]))
    return steady_rate(samples, iters)


CLIENT = """
import sys
from gradio_client import Client
args = ["tiny", "Style", "Photo", "Sketch", [], [], int(sys.argv[2]), 2, 0.002, 0, 1, 0.0, ["tiny"], 1.0, 1.0, 0, 2]
job = Client(sys.argv[1], verbose=False).submit(*args, api_name="/train")
for _ in job:      # every update, as a page reads them
    pass
"""


def app_rate(url, studio, iters: int) -> float:
    """The page is another process (here gradio_client in a subprocess, as a browser would be), and the run is
    sampled every 0.2 s: a finer poll in this process would itself take time from the training thread."""
    client = subprocess.Popen([sys.executable, "-c", CLIENT, url, str(iters)], cwd=ROOT)
    samples = []
    try:
        while client.poll() is None:
            active = studio.active_run()
            if active:
                view = active[0].view()
                if view.step and (not samples or samples[-1][1] != view.step):
                    samples.append((time.monotonic(), view.step))
            time.sleep(0.2)
    finally:
        client.wait()
    return steady_rate(samples, iters)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nada_bench_"))
    os.environ["NADA_LIBRARY_DIR"] = str(tmp / "library")
    from tests.app_server import launch_tiny  # with the process settings app.py enters (the CLI: the same)

    demo, studio, url = launch_tiny()
    cli, app = [], []
    try:
        for r in range(args.repeats):     # alternated, so a change in the machine's load hits both
            cli.append(cli_rate(args.iters, tmp / f"cli{r}"))
            app.append(app_rate(url, studio, args.iters))
            print(f"repeat {r + 1}: CLI {cli[-1]:.1f} steps/s, app {app[-1]:.1f} steps/s "
                  f"({app[-1] / cli[-1]:.0%})", flush=True)
    finally:
        demo.close()
    best_cli, best_app = max(cli), max(app)
    ratios = sorted(a / c for a, c in zip(app, cli))
    print(f"tiny recipe, {args.iters} iterations, best of {args.repeats}: CLI {best_cli:.1f} steps/s, "
          f"app {best_app:.1f} steps/s = {best_app / best_cli:.0%} of the CLI; median of the paired ratios "
          f"{ratios[len(ratios) // 2]:.0%}")


if __name__ == "__main__":
    main()
