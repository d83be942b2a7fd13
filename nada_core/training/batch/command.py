"""``python -m nada_core batch``: check the file, show the plan, run the jobs here or on Ray, print the summary."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TextIO

from ...store.library import default_device, library_dir
from ..run import stop_on_ctrl_c
from .cluster import _connect, _run_on_ray
from .jobs import BatchError, Job, load_jobs
from .local import Stop, _run_here
from .progress import JobResult, ProgressView, summary_table


def run_batch(jobs: list[Job], library: Path, ray_address: str | None = None, cpus_per_job: int = 1,
              ship_weights: bool = False, device: str | None = None, stream: TextIO | None = None,
              progress_every: float = 10.0, _cluster: tuple | None = None, stop: Stop | None = None) -> list[JobResult]:
    """Run every job (here, one after another, or on Ray when ``ray_address`` is given) and install each
    finished model into ``library``. Returns one JobResult per job; failures are in them, never raised.
    ``stop`` (here only): once requested, the training job stops and is kept resumable, and no other starts."""
    results = [JobResult(j) for j in jobs]
    view = ProgressView(results, stream, progress_every)
    if ray_address is None:
        _run_here(results, view, Path(library), device or default_device(), stop)
    else:
        ray, resources, dev, _, started = _cluster or _connect(ray_address, cpus_per_job)
        try:
            _run_on_ray(ray, results, view, Path(library), resources, dev, cpus_per_job, ship_weights)
        finally:
            if started and _cluster is None:
                ray.shutdown()
    view.close()
    return results


def batch_command(args) -> int:
    """``python -m nada_core batch``: check the file, show the plan, run, print the summary table."""
    if args.cpus_per_job < 1:
        raise BatchError("--cpus-per-job must be 1 or more")
    if args.ship_weights and not args.ray:
        raise BatchError("--ship-weights goes with --ray (without Ray the weights are read here)")
    library = Path(args.library) if args.library else library_dir()
    cluster = None
    try:
        if args.ray:
            cluster = _connect(args.ray, args.cpus_per_job)
            device, plan = cluster[2], cluster[3]
        else:
            device = args.device or default_device()
            plan = f"one after another on this machine ({device})"
        jobs, warnings = load_jobs(args.jobs, "cuda" if str(device).startswith("cuda") else "cpu",
                                   need_files=not args.ray or args.ship_weights, library=library,
                                   skip_existing=args.skip_existing)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(f"{len(jobs)} job(s), {plan}; models go to {library}", file=sys.stderr)
        for j in jobs:
            print(f"  {j.index:>3} {j.name}: {j.base}, {j.what}, {j.recipe.iterations} steps, "
                  f"CLIP {'+'.join(j.recipe.clip_models)}", file=sys.stderr)
        if args.check or not jobs:
            return 0
        stop = Stop()
        with contextlib.nullcontext() if args.ray else stop_on_ctrl_c(stop, "stopping the job after this step and "
                                                                              "saving it; no other job starts"):
            results = run_batch(jobs, library, args.ray, args.cpus_per_job, args.ship_weights, device,
                                _cluster=cluster, stop=stop)
    finally:
        if cluster and cluster[4]:   # this command started or joined Ray: leave it
            cluster[0].shutdown()
    print(summary_table(results))
    failed = [r for r in results if r.state == "failed"]
    if failed:
        print(f"{len(failed)} of {len(results)} job(s) failed", file=sys.stderr)
    if stop.requested:
        left = [r for r in results if r.state == "queued"]
        print(f"stopped by Ctrl-C; {len(left)} job(s) not started", file=sys.stderr)
        return 130
    return 1 if failed else 0
