"""Batch adaptation: ``python -m nada_core batch JOBS.toml`` trains a list of recipes, one after another on
this machine, or spread over a Ray cluster with ``--ray auto|local|ADDRESS``.

The file holds optional ``[defaults]`` and one ``[[job]]`` table per model::

    [defaults]
    base = "ffhq"
    clip = ["ViT-B-32", "ViT-B-16"]
    iterations = 300

    [[job]]
    name = "sketch"
    target = "pencil sketch"

    [[job]]
    name = "starry"
    style_images = ["styles/starry-night.jpg"]     # paths relative to this file

A job's keys are ``name``, ``base``, ``clip`` and any field of :class:`nada_core.training.adapt.Recipe` (``source``,
``target``, ``style_images``, ``source_images``, ``iterations``, ``batch``, ``lr``, ``preset``, ``k``, ``mixing``,
``clip_weights``, ``seed``, ...) except ``snapshot_every``: batch runs keep no snapshots. A base is a name only:
'tiny', a weights manifest name ('ffhq', ...) or a library model, never a file path. The whole file is checked
before anything runs; every problem of every job is reported with its job and field.

Every job trains in a temporary folder of the machine that runs it; the driver (this process) writes the
finished run folder -- ``recipe.json``, ``final.safetensors``, ``thumb.png`` -- into the library, so the
app lists it, and a cluster needs no shared disk for the results. A failed job is tried once more, then
reported; the exit code is 1 if any job failed. Here, the first Ctrl-C stops the job training after its step
(``Run.stop``: it is kept, resumable) and starts no other; the exit code is then 130.

On a cluster each job takes one GPU (when the cluster has GPUs) or ``--cpus-per-job`` CPUs. The code and the
weights manifest travel with the jobs (Ray's ``working_dir``); the weights are read on each node from the
driver's weights folder path (``NADA_WEIGHTS_DIR``, a path every node must see), or with ``--ship-weights``
sent through Ray's object store (the base generator as our safetensors, the CLIP files as they are); a library
model as a base is always sent that way.
Ray is imported only here, only when asked for (``pip install -r requirements-cluster.txt``).

The package: ``jobs`` (the file and its checks), ``local`` (one job on this machine, through ``training.run.Run``;
installing a run; the sequential driver), ``progress`` (the terminal lines and the summary), ``cluster`` (Ray) and
``command`` (``run_batch`` and the CLI command).
"""
from __future__ import annotations

from .cluster import _cluster_plan, _stage_code
from .command import batch_command, run_batch
from .jobs import MAX_TRIES, BatchError, Job, job_keys, load_jobs
from .local import CLUSTER_HINT, RUN_FILES, JobFailed, attempt, install_run, run_job
from .progress import JobResult, ProgressView, _apply_event, summary_table

__all__ = ["BatchError", "CLUSTER_HINT", "Job", "JobFailed", "JobResult", "MAX_TRIES", "ProgressView", "RUN_FILES",
           "attempt", "batch_command", "install_run", "job_keys", "load_jobs", "run_batch", "run_job", "summary_table",
           "_apply_event", "_cluster_plan", "_stage_code"]
