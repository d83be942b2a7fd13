"""A run folder: the one place that names a training run's files and does what happens to them.

    recipe.json / mapper.json   what the run is (written when the run starts; the library lists folders by it)
    snapshots/step_NNNNN.*      weights every ``snapshot_every`` steps, and at the step where a run was stopped
    state.pt                    optimiser, sampler and history of the newest snapshot (what Continue resumes)
    diagnostics.json            {step: figures} of every measured step
    final.safetensors / mapper.safetensors   the weights of the last finished step
    thumb.png                   source row above adapted row, from the last preview
    .active                     locked (flock) while a process trains in the folder: rename and delete wait

Adaptation runs and latent-mapper runs share the layout; they differ in two file names (``RunKind``).
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .bounded_json import load_file
from .checkpoints import atomic_write

try:
    import fcntl
except ImportError:  # not POSIX: the lock is the file's existence
    fcntl = None

STATE = "state.pt"
DIAGNOSTICS = "diagnostics.json"
THUMB = "thumb.png"
SNAPSHOTS = "snapshots"
ACTIVE = ".active"
TRASH = ".trash"                 # library folder of runs set aside (short stopped runs) until kept or emptied
MAPPERS = "mappers"              # library folder of the latent-mapper runs
TINY = "_tiny"                   # library folder of the tiny test models' runs (the app's --tiny)
RESERVED = frozenset({TRASH, MAPPERS, TINY, SNAPSHOTS})   # library folder names that never name a model


def is_reserved(name: str) -> bool:
    """Whether a library folder of this name is the library's own (``RESERVED``, hidden or half-written)."""
    return name in RESERVED or name.startswith((".", "_")) or name.endswith(".part")
MAX_RECIPE_BYTES = 1 << 20       # a recipe.json is a few KB; a larger one is not read


@dataclass(frozen=True)
class RunKind:
    recipe: str
    final: str
    suffix: str = ".safetensors"


ADAPTATION = RunKind("recipe.json", "final.safetensors")
MAPPER = RunKind("mapper.json", "mapper.safetensors")


class RunBusy(RuntimeError):
    """The run is training (here or in another process): it cannot be renamed, deleted or continued now."""


class RunFolder:
    def __init__(self, path: str | os.PathLike, kind: RunKind = ADAPTATION):
        self.path, self.kind = Path(path), kind
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------ file names
    @property
    def recipe_path(self) -> Path:
        return self.path / self.kind.recipe

    @property
    def final_path(self) -> Path:
        return self.path / self.kind.final

    @property
    def state_path(self) -> Path:
        return self.path / STATE

    @property
    def diagnostics_path(self) -> Path:
        return self.path / DIAGNOSTICS

    @property
    def thumb_path(self) -> Path:
        return self.path / THUMB

    @property
    def snapshots_dir(self) -> Path:
        return self.path / SNAPSHOTS

    def snapshot_path(self, step: int) -> Path:
        return self.snapshots_dir / f"step_{int(step):05d}{self.kind.suffix}"

    def export_path(self, suffix: str) -> Path:
        """Where an export of the final weights goes (``<run name><suffix>``, e.g. the rosinality ``.pt``)."""
        return self.path / f"{self.name}{suffix}"

    # ------------------------------------------------------------ what is there
    def snapshots(self) -> list[Path]:
        return sorted(self.snapshots_dir.glob(f"step_*{self.kind.suffix}"))

    def snapshot_steps(self) -> list[int]:
        steps = []
        for p in self.snapshots():
            try:
                steps.append(int(p.name[len("step_"):-len(self.kind.suffix)]))
            except ValueError:
                continue
        return steps

    @property
    def finished(self) -> bool:
        """Has final weights (a run that ran to its end, or one stopped and saved)."""
        return self.final_path.is_file()

    @property
    def continuable(self) -> bool:
        """Holds a resumable state: stopped, crashed after a snapshot, or finished (continue for more steps)."""
        return self.state_path.is_file() and self.recipe_path.is_file()

    def weights(self) -> Path | None:
        """The weights a library user gets: the final ones, else the newest snapshot (a crashed run)."""
        if self.finished:
            return self.final_path
        snaps = self.snapshots()
        return snaps[-1] if snaps else None

    def read_record(self) -> dict:
        """The recipe file's JSON object (``{"base", "config", "recipe"}`` for adaptation runs). ValueError for a
        missing, oversized, too deeply nested or unreadable one (``bounded_json``: checked before it is parsed)."""
        what = f"{self.name}: {self.kind.recipe}"
        try:
            record = load_file(self.recipe_path, what, dict, MAX_RECIPE_BYTES)
        except FileNotFoundError:
            raise ValueError(f"{self.path} holds no run ({self.kind.recipe} is missing)") from None
        except OSError as e:
            raise ValueError(f"{what} is not readable ({type(e).__name__})") from None
        if not isinstance(record.get("recipe", {}), dict):
            raise ValueError(f"{what} does not describe a run")
        return record

    # ------------------------------------------------------------ lifecycle
    def create(self, record: dict) -> None:
        """Start a new run here: the folder may exist (empty, made exclusively by ``new_run_dir``) but must not
        hold a run, so a new run never overwrites a model."""
        if self.recipe_path.exists():
            raise ValueError(f"{self.path} already holds a run; continue it or choose a new folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self.remove_stale_parts()
        self.write_record(record)

    def reopen(self) -> None:
        """Continue the run here: its recipe must be there; half-written files of a killed process go."""
        if not self.recipe_path.is_file():
            raise ValueError(f"{self.path} holds no run ({self.kind.recipe} is missing)")
        self.remove_stale_parts()

    def write_record(self, record: dict) -> None:
        text = json.dumps(record, indent=2)
        atomic_write(self.recipe_path, lambda t: Path(t).write_text(text))

    def remove_stale_parts(self) -> list[Path]:
        """Delete half-written temporary files (``.<name>.*.part``, see ``atomic_write``) of a killed process."""
        removed = []
        for d in (self.path, self.snapshots_dir):
            if d.is_dir():
                for p in d.glob(".*.part"):
                    p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    def prune(self, keep: int = 5) -> int:
        """Keep the newest ``keep`` snapshots (state.pt names the newest, so Continue still works)."""
        snaps = self.snapshots()
        for p in snaps[:-keep] if keep else snaps:
            p.unlink(missing_ok=True)
        return max(0, len(snaps) - keep)

    def write_thumb(self, image) -> Path:
        """Save a PIL image as the run's thumbnail, atomically (the library may be listing it)."""
        return atomic_write(self.thumb_path, lambda t: image.save(t, format="PNG"))

    def set_aside(self) -> "RunFolder":
        """Move the run out of the library listing into ``.trash`` (kept until restored or the trash is emptied)."""
        trash = self.path.parent / TRASH
        trash.mkdir(exist_ok=True)
        dest = trash / self.name
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(self.path, dest)
        (dest / ACTIVE).unlink(missing_ok=True)   # a training lock moved with it (the holder keeps its descriptor)
        return RunFolder(dest, self.kind)

    def copy_snapshot_as_model(self, step: int, dest: Path) -> "RunFolder":
        """A new library model from the snapshot at ``step`` (weights, the recipe, the thumbnail if given later),
        written into a temporary folder first so a full disk leaves no half model."""
        src = self.snapshot_path(step)
        if not src.is_file():
            raise ValueError(f"there is no snapshot at iteration {int(step)}")
        if dest.exists():
            raise ValueError(f"{dest.name} already exists")
        tmp = dest.parent / f".{dest.name}.part"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            shutil.copy(src, tmp / self.kind.final)
            shutil.copy(self.recipe_path, tmp / self.kind.recipe)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return RunFolder(dest, self.kind)

    # ------------------------------------------------------------ the training lock
    @contextmanager
    def active(self):
        """Held while a process trains here. Raises RunBusy when another holder has it."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / ACTIVE
        if fcntl is None:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                raise RunBusy(f"{self.name} is training") from None
        else:
            fd = self._flock(lock)
        self._lock_fd = fd
        try:
            yield self
        finally:
            self._lock_fd = None
            lock.unlink(missing_ok=True)   # while still locked: a waiter then sees its inode is stale and retries
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _flock(lock: Path) -> int:
        """An exclusive non-blocking flock on ``lock``, re-opened if the file was replaced meanwhile."""
        while True:
            fd = os.open(lock, os.O_CREAT | os.O_WRONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RunBusy(f"{lock.parent.name} is training") from None
            try:
                if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def is_active(self) -> bool:
        """Whether some process (this one included) is training in the folder now."""
        if self._lock_fd is not None:
            return True
        lock = self.path / ACTIVE
        if not lock.exists():
            return False
        if fcntl is None:
            return True
        try:
            fd = os.open(lock, os.O_WRONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    @contextmanager
    def idle(self, what: str):
        """Hold the lock for a moment (rename, delete): refused with a clear message while the run trains."""
        try:
            with self.active():
                yield
        except RunBusy:
            raise RunBusy(f"{self.name} is training; stop the run before you {what} it") from None
