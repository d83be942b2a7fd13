"""Jobs over a Ray cluster: one GPU (or N CPUs) per job, weights and images shipped through the object store when
asked, step reports through a small actor. Ray is imported only here, only when asked for."""
from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from ...models.tiny import is_tiny
from ...store import weights
from ...store.checkpoints import save_generator
from ...store.library import load_named_base
from ..loop import describe_error
from .jobs import BatchError, Job
from .local import CLUSTER_HINT, _failure_text, _finish_try, attempt
from .progress import JobResult, ProgressView, _apply_event


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BatchError(f"--ray needs Ray, which is not installed: {CLUSTER_HINT}") from None
    return ray


def _stage_code(folder: Path) -> Path:
    """A small working_dir for Ray: this package and the weights manifest (nodes need no copy of the project)."""
    here = Path(__file__).resolve().parents[2]  # the nada_core package
    shutil.copytree(here, folder / "nada_core", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (folder / "weights").mkdir()
    shutil.copy2(weights.MANIFEST_PATH, folder / "weights" / "manifest.json")
    return folder


class _Board:
    """A Ray actor collecting the jobs' step events; the driver drains it twice a second."""

    def __init__(self):
        self.events: list[tuple[int, int, dict]] = []

    def report(self, index: int, tries: int, event: dict) -> None:
        self.events.append((index, tries, event))

    def drain(self) -> list[tuple[int, int, dict]]:
        events, self.events = self.events, []
        return events


def _ray_job(job: Job, device: str, threads: int, board, tries: int, base_blob, clip_refs: dict,
             images: dict) -> dict:
    """The task a Ray worker runs: one try of one job (see ``attempt``)."""
    import ray

    def report(d: dict) -> None:
        try:
            board.report.remote(job.index, tries, d)
        except Exception:  # noqa: BLE001 - a lost progress actor must not fail the job
            pass

    report({"kind": "start", "where": f"{socket.gethostname()} ({device})"})
    blobs = ray.get(list(clip_refs.values())) if clip_refs else []
    shipped = {"base": base_blob, "clip": dict(zip(clip_refs, blobs)), "images": images}
    return attempt(job, device, report, shipped, threads)


def _ship(ray, jobs: list[Job], weights_too: bool = True) -> tuple[dict, dict]:
    """Put each distinct base in the object store once: library models always (nodes see no library), manifest
    bases (as our safetensors, loaded here on the CPU) and CLIP files when ``weights_too`` (--ship-weights)."""
    bases, clips = {}, {}
    for job in jobs:
        if job.base in bases or is_tiny(job.base):
            pass
        elif job.base_file:   # already our safetensors, checked on the driver
            bases[job.base] = ray.put(Path(job.base_file).read_bytes())
        elif weights_too:
            G, _ = load_named_base(job.base, "cpu")
            with tempfile.TemporaryDirectory() as tmp:
                p = save_generator(G, Path(tmp) / "base.safetensors")
                bases[job.base] = ray.put(p.read_bytes())
            del G
        for name in job.recipe.clip_models if weights_too else ():
            if not is_tiny(name) and name not in clips:
                asset = weights.get_asset(f"clip-{name}")
                clips[name] = (asset.file, ray.put(asset.path.read_bytes()))
    return bases, clips


def _cluster_plan(ray, cpus_per_job: int) -> tuple[dict, str, str]:
    """(task resources, device, a line describing the plan); BatchError when no node can take a job."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    gpus = sum(n.get("GPU", 0) for n in nodes)
    fits = [n for n in nodes if n.get("CPU", 0) >= cpus_per_job and (n.get("GPU", 0) >= 1 or not gpus)]
    if not fits:
        most = max((n.get("CPU", 0) for n in nodes), default=0)
        raise BatchError(f"no node of the cluster has {cpus_per_job} CPUs{' and a GPU' if gpus else ''} for one job "
                         f"(the largest has {most:g}); lower --cpus-per-job")
    if gpus:
        return ({"num_gpus": 1, "num_cpus": cpus_per_job}, "cuda",
                f"Ray cluster: {len(nodes)} node(s), {gpus:g} GPU(s); one job per GPU")
    cpus = sum(n.get("CPU", 0) for n in nodes)
    return ({"num_cpus": cpus_per_job}, "cpu",
            f"Ray cluster: {len(nodes)} node(s), no GPU, {cpus:g} CPUs; {cpus_per_job} CPU(s) per job")


def _run_on_ray(ray, results: list[JobResult], view: ProgressView, library: Path, resources: dict, device: str,
                cpus_per_job: int, ship_weights: bool) -> None:
    jobs = [r.job for r in results]
    bases, clips = _ship(ray, jobs, ship_weights)
    # style and source images are small and were checked here: they always travel with their job
    images = {j.index: {p: Path(p).read_bytes() for p in j.recipe.style_images + j.recipe.source_images} for j in jobs}
    env = {"env_vars": {"NADA_WEIGHTS_DIR": str(weights.weights_dir().resolve())}}
    board = ray.remote(num_cpus=0)(_Board).options(runtime_env=env).remote()
    task = ray.remote(_ray_job).options(max_retries=0, runtime_env=env, **resources)
    pending: dict = {}

    def submit(r: JobResult) -> None:
        r.tries += 1
        clip_refs = {clips[n][0]: clips[n][1] for n in r.job.recipe.clip_models if n in clips}
        ref = task.remote(r.job, device, cpus_per_job, board, r.tries, bases.get(r.job.base), clip_refs,
                          images[r.job.index])
        pending[ref] = r

    by_index = {r.job.index: r for r in results}
    for r in results:
        submit(r)
    drain = board.drain.remote()
    view.refresh(force=True)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            events = []
            if drain is not None and ray.wait([drain], timeout=0)[0]:   # never wait on the progress actor
                try:
                    events = ray.get(drain)
                    drain = board.drain.remote()
                except Exception as e:  # noqa: BLE001 - progress lines are a nicety: lose them, never the batch
                    view.note(f"progress reports stopped ({describe_error(e)}); the jobs go on")
                    drain = None
            for index, tries, d in events:
                r = by_index[index]
                if tries == r.tries and r.state in ("queued", "running"):
                    _apply_event(r, d, view)
            for ref in done:
                r = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - crashed workers, lost nodes, objects lost
                    outcome = {"error": _failure_text(getattr(e, "cause", None) or e)}
                if _finish_try(r, view, library, outcome):
                    submit(r)
            view.refresh()
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        ray.kill(board)


def _connect(address: str, cpus_per_job: int):
    """Join (or with 'local' start) a Ray cluster: (ray, task resources, device, plan line, started_here)."""
    ray = _import_ray()
    started = False
    if not ray.is_initialized():  # else the caller's Ray job already decides how workers find this code
        with tempfile.TemporaryDirectory(prefix="nada-batch-code-") as stage:  # uploaded by ray.init
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         runtime_env={"working_dir": str(_stage_code(Path(stage)))})
            except ConnectionError as e:
                raise BatchError(f"could not reach a Ray cluster at {address!r} ({e}); start one with "
                                 "`ray start --head`, or use --ray local") from None
        started = True
    resources, device, plan = _cluster_plan(ray, cpus_per_job)
    return ray, resources, device, plan, started
