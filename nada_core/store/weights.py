"""Named assets from ``weights/manifest.json``: where they live, whether they are there, and downloads.

Downloads are safe to start twice (two users, or the app and the CLI): one writer per file across threads
and processes, through a lock file beside it; a second caller waits and then finds the file done. They
resume from ``<file>.part`` with an HTTP Range request and rename onto the final name only once the part
is shown complete (a size the server or the manifest states is reached) and verified (the manifest's
sha256, else the one the server publishes, as Hugging Face does in ``X-Linked-ETag``), so a half file
never sits under the real name. Each finished download records size and sha256 in
``<file>.verified.json`` (trust on first use), so later corruption is caught even where the manifest pins
nothing. Without network the error says which file is missing, its URL and where to put it by hand.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: fall back on an O_EXCL lock file
    fcntl = None

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST_PATH = Path(os.environ.get("NADA_MANIFEST") or REPO_ROOT / "weights" / "manifest.json")
CHUNK = 1 << 20
LOCK_WAIT = 3600.0  # seconds a second download of the same file waits for the first to finish

Progress = Callable[[int, "int | None"], None]


class WeightsError(RuntimeError):
    """A named asset is missing, could not be fetched, or failed verification."""


def weights_dir() -> Path:
    """Where downloaded files live: ``$NADA_WEIGHTS_DIR`` or the repo's ``weights/``."""
    return Path(os.environ.get("NADA_WEIGHTS_DIR", REPO_ROOT / "weights"))


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str
    file: str
    url: str | None = None
    sha256: str | None = None
    size: int | None = None
    label: str = ""
    license: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def path(self) -> Path:
        """Where the file is: inside its pip package for packaged assets, else under weights/."""
        if self.extra.get("package"):
            spec = importlib.util.find_spec(self.extra["package"])  # locate without importing it
            if spec and spec.submodule_search_locations:
                return Path(list(spec.submodule_search_locations)[0]) / self.extra["package_file"]
        return weights_dir() / self.file

    @property
    def present(self) -> bool:
        return self.path.is_file()

    def how_to_get(self) -> str:
        if self.extra.get("package"):
            pip_name = self.extra["package"].replace("_", "-")
            return f"install it with `pip install {pip_name}` (it ships {self.extra['package_file']})"
        return (f"run `python -m nada_core weights download {self.name}`, or download {self.url} by hand "
                f"and save it as {self.path}")


def load_manifest(path: Path | None = None) -> dict[str, Asset]:
    """The manifest's assets, parsed once per file version (callers look assets up often)."""
    path = Path(path or MANIFEST_PATH)
    return dict(_parse_manifest(path, path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _parse_manifest(path: Path, mtime_ns: int) -> dict[str, Asset]:
    data = json.loads(path.read_text())
    known = {"kind", "file", "url", "sha256", "size", "label", "license"}
    return {name: Asset(name=name, **{k: v for k, v in entry.items() if k in known},
                        extra={k: v for k, v in entry.items() if k not in known})
            for name, entry in data["assets"].items()}


def get_asset(name: str, manifest: dict[str, Asset] | None = None) -> Asset:
    manifest = manifest or load_manifest()
    if name not in manifest:
        raise WeightsError(f"unknown asset {name!r}; known: {', '.join(sorted(manifest))}")
    return manifest[name]


def require(name: str, manifest: dict[str, Asset] | None = None) -> Path:
    """Path of a present asset, or an error that says exactly how to get it."""
    asset = get_asset(name, manifest)
    if not asset.present:
        raise WeightsError(f"{asset.label or name} is not downloaded ({asset.path} is missing): {asset.how_to_get()}.")
    return asset.path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- records (trust on first use)
def record_path(asset: Asset) -> Path:
    """The file's verification record lives beside it, so it moves and is deleted with it."""
    return asset.path.with_name(asset.path.name + ".verified.json")


def read_record(asset: Asset) -> dict:
    """``{"size", "sha256", "source", ...}`` as recorded when the file was downloaded or trusted; {} if none."""
    try:
        return json.loads(record_path(asset).read_text())
    except (OSError, ValueError):
        return {}


def _write_record(asset: Asset, size: int, sha256: str, source: str) -> None:
    rec = record_path(asset)
    tmp = rec.with_name(rec.name + ".tmp")  # callers hold the writer lock, so the name is ours
    tmp.write_text(json.dumps({"size": size, "sha256": sha256, "source": source,
                               "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
    os.replace(tmp, rec)


def verify(asset: Asset) -> str:
    """'missing'; 'ok' when the file matches its pin in the manifest, or else its record (written when it
    was downloaded or trusted); 'size mismatch' / 'sha256 mismatch' when it does not (corrupted, cut or
    replaced since); 'unverified' when there is neither pin nor record (a file placed by hand)."""
    if not asset.present:
        return "missing"
    rec = read_record(asset)  # the manifest's pins win over the record
    size = asset.size if asset.size is not None else rec.get("size")
    if size is not None and asset.path.stat().st_size != size:
        return "size mismatch"
    want = asset.sha256 or rec.get("sha256")
    prefix = asset.extra.get("sha256_prefix")  # torchvision-style: the file name carries the hash's start
    if not want and not prefix:
        return "unverified"
    digest = sha256_of(asset.path)
    good = (not want or digest == want) and (not prefix or digest.startswith(prefix))
    return "ok" if good else "sha256 mismatch"


# ---------------------------------------------------------------------------- one writer per file
def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _try_lock(lock: Path) -> int | None:
    """A descriptor holding ``lock``, or None while someone else holds it."""
    if fcntl is None:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return None
        os.write(fd, str(os.getpid()).encode())
        return fd
    fd = os.open(lock, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(lock).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)  # held, or the holder removed the file as we opened it: try again on the new one
    return None


@contextlib.contextmanager
def _writer_lock(dest: Path, name: str, wait: float, on_wait: Callable[[], None] | None = None):
    """Hold ``<file>.lock`` while ``<file>.part`` is written, so two callers never append to one part.

    POSIX flock is released by the OS when a process dies, so a killed download leaves no stale lock (its
    ``.part`` is resumed by the next caller). The O_EXCL fallback (other systems) cannot tell a dead
    holder from a slow one: the timeout message says which file to delete.
    """
    lock = dest.with_name(dest.name + ".lock")
    deadline = time.monotonic() + wait
    while (fd := _try_lock(lock)) is None:
        if time.monotonic() >= deadline:
            stale = "" if fcntl else f" If no download is running, delete {lock}."
            raise WeightsError(f"another download of {name} is still writing {dest.name}.part (waited {wait:.0f} s "
                               f"for {lock}); try again when it has finished.{stale}")
        if on_wait:
            on_wait()
        time.sleep(0.1)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # while still holding it: a waiter that opened this file sees it gone and retries
        os.close(fd)


# ---------------------------------------------------------------------------- download
class _KeepLinked(urllib.request.HTTPRedirectHandler):
    """Hugging Face states X-Linked-Size / X-Linked-ETag on its redirect to the CDN, not on the file."""

    def __init__(self, linked: dict):
        self.linked = linked

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _collect_linked(headers, self.linked)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _collect_linked(headers, linked: dict) -> None:
    """The full size and sha256 a server publishes (``X-Linked-ETag`` is the LFS sha256, maybe quoted)."""
    if headers is None:
        return
    size = headers.get("X-Linked-Size") or ""
    etag = (headers.get("X-Linked-ETag") or "").strip().removeprefix("W/").strip('"').lower()
    if size.isdigit():
        linked.setdefault("size", int(size))
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        linked.setdefault("sha256", etag)


def _content_range(headers) -> tuple[int | None, int | None]:
    """(first byte, full size) from ``bytes 700-999/1000`` or ``bytes */1000``; None where not stated."""
    m = re.match(r"bytes (\d+|\*)(?:-\d+)?/(\d+|\*)", (headers and headers.get("Content-Range")) or "")
    if not m:
        return None, None
    return tuple(int(v) if v.isdigit() else None for v in m.groups())


def _open(url: str, start: int, timeout: float, linked: dict):
    req = urllib.request.Request(url, headers={"User-Agent": "nada-studio/1", **({"Range": f"bytes={start}-"} if start else {})})
    return urllib.request.build_opener(_KeepLinked(linked)).open(req, timeout=timeout)


def _mirrored(url: str | None) -> str | None:
    """Honour ``HF_ENDPOINT`` (a Hugging Face mirror) as huggingface_hub does."""
    endpoint = os.environ.get("HF_ENDPOINT")
    if url and endpoint and url.startswith("https://huggingface.co/"):
        return endpoint.rstrip("/") + url[len("https://huggingface.co"):]
    return url


def download(asset: Asset, progress: Progress | None = None, timeout: float = 30.0, url: str | None = None,
             wait: float = LOCK_WAIT) -> Path:
    """Fetch ``asset`` to its path and verify it; a file already there that passes (or has nothing to be
    checked against: placed by hand) is kept. A concurrent call for the same file waits up to ``wait``
    seconds for the first (``progress`` then shows the other's part growing) and finds the file done;
    a ``.part`` left by an interrupted or killed run is resumed."""
    if asset.extra.get("package"):
        if asset.present:
            return asset.path
        raise WeightsError(f"{asset.label or asset.name} is missing: {asset.how_to_get()}.")
    dest = asset.path
    if verify(asset) in ("ok", "unverified"):
        return dest
    url = _mirrored(url or asset.url)
    if not url:
        raise WeightsError(f"{asset.name} has no download URL; place the file at {dest}.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    waiting = (lambda: progress(_size(part), asset.size)) if progress else None
    with _writer_lock(dest, asset.name, wait, waiting):
        if verify(asset) in ("ok", "unverified"):  # another caller finished it while we waited
            return dest
        total, linked = _fetch(asset, url, part, progress, timeout)
        _land(asset, part, total, linked)
    return dest


def _fetch(asset: Asset, url: str, part: Path, progress: Progress | None, timeout: float) -> tuple[int | None, dict]:
    """Append the rest of ``url`` to ``part`` (the caller holds the lock). Returns the full size the
    response stated (None if it did not) and what the server published (``size``, ``sha256``)."""
    start, linked, total = _size(part), {}, None
    dest = asset.path
    try:
        resp = _open(url, start, timeout, linked)
    except urllib.error.HTTPError as e:
        _collect_linked(e.headers, linked)
        if e.code == 416 and start:  # the part may already hold every byte: _land checks the size
            resp, total = None, _content_range(e.headers)[1]
        else:
            raise WeightsError(f"download of {asset.name} failed: {url} answered HTTP {e.code} {e.reason}. "
                               f"Get the file elsewhere and save it as {dest}.") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise WeightsError(f"cannot reach {url} ({reason}); this machine looks offline. "
                           f"Download {asset.name} by hand from that URL and save it as {dest}, "
                           f"then run `python -m nada_core weights verify`.") from None
    if resp is None:
        return total, linked
    try:
        with resp:
            _collect_linked(resp.headers, linked)
            if start and resp.status != 206:
                start = 0  # server ignored the Range header: start over
            elif start:
                first, total = _content_range(resp.headers)
                if first != start:
                    raise WeightsError(f"{url} answered a resume from byte {start} with bytes from {first}; "
                                       f"delete {part} and download again.")
            length = resp.headers.get("Content-Length")
            if length is not None:
                total = start + int(length)
            expect = next((v for v in (asset.size, linked.get("size"), total) if v is not None), None)
            done = start
            with open(part, "ab" if start else "wb") as out:
                for chunk in iter(lambda: resp.read(CHUNK), b""):
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, expect)
    except (OSError, http.client.HTTPException) as e:
        if getattr(e, "errno", None) == errno.ENOSPC:
            free = shutil.disk_usage(dest.parent).free
            raise WeightsError(f"disk full while saving {asset.name} to {dest.parent} ({free >> 20} MiB free); "
                               f"free some space and download again: it resumes from {part}.") from None
        raise WeightsError(f"download of {asset.name} was interrupted ({e}); run it again to resume from {part}.") from None
    return total, linked


def _land(asset: Asset, part: Path, total: int | None, linked: dict) -> None:
    """Rename ``part`` onto the final name only once complete and verified, and record what was verified.

    Complete means the size the response (or the server's X-Linked-Size, or the manifest) states was
    reached: a body without Content-Length that ends early looks like a clean end, so with no size
    known at all the part is kept and the next run's Range request makes the server state it.
    """
    got = _size(part)
    stated = total if total is not None else linked.get("size")
    expected = stated if stated is not None else asset.size
    if expected is None:
        raise WeightsError(f"download of {asset.name} is incomplete as far as can be told: {got} bytes came but the "
                           f"server did not state the size; run it again to resume from {part} (its answer then "
                           "states the size).")
    if got < expected:
        raise WeightsError(f"download of {asset.name} is incomplete ({got} of {expected} bytes); "
                           f"run it again to resume from {part}.")
    if got != expected or (asset.size is not None and got != asset.size):
        part.unlink()
        raise WeightsError(f"{asset.name}: got {got} bytes, expected {asset.size or expected}; "
                           "the partial file was removed, try again.")
    want, source = (asset.sha256, "manifest") if asset.sha256 else (linked.get("sha256"), "server")
    prefix = asset.extra.get("sha256_prefix")
    digest = sha256_of(part)
    if (want and digest != want) or (prefix and not digest.startswith(prefix)):
        part.unlink()
        raise WeightsError(f"{asset.name}: sha256 mismatch (got {digest[:12]}..., the {source} says "
                           f"{(want or prefix)[:12]}...); the file was removed. The source may have changed "
                           "or the transfer was corrupted.")
    os.replace(part, asset.path)
    _write_record(asset, got, digest, source if want else "first download")


# ---------------------------------------------------------------------------- repair
def trust(asset: Asset) -> str:
    """Record the current size and sha256 of a file placed by hand, so later changes to it are caught.
    Only on the user's word: nothing says these bytes are the right ones."""
    with _writer_lock(asset.path, asset.name, LOCK_WAIT):
        digest = sha256_of(asset.path)
        _write_record(asset, _size(asset.path), digest, "trusted by user")
    return digest


def repair(names: list[str] | None = None, progress: Callable[[str, int, "int | None"], None] | None = None,
           trust_unverified: bool = False, manifest: dict[str, Asset] | None = None) -> list[tuple[str, str]]:
    """Verify files and mend what can be mended: fetch again any that fail their pin or record (and, when
    named, missing ones); with ``trust_unverified``, record the hash of files that have neither (placed by
    hand). Default: every present file. ``progress(name, done, total)`` follows each download. Returns
    ``(name, result)`` per asset: 'ok', 'unverified', 'trusted', 'downloaded', 'repaired (was ...)' or
    'failed: <why>'; one failure does not stop the others."""
    manifest = manifest or load_manifest()
    assets = [get_asset(n, manifest) for n in names] if names else [a for a in manifest.values() if a.present]
    results = []
    for a in assets:
        state = verify(a)
        try:
            if state == "ok" or (state == "unverified" and (not trust_unverified or a.extra.get("package"))):
                result = state  # a pip package's files are pip's to manage
            elif state == "unverified":
                trust(a)
                result = "trusted"
            else:
                download(a, progress=(lambda d, t, n=a.name: progress(n, d, t)) if progress else None)
                result = "downloaded" if state == "missing" else f"repaired (was {state})"
        except WeightsError as e:
            result = f"failed: {e}"
        results.append((a.name, result))
    return results


def status_rows(manifest: dict[str, Asset] | None = None) -> Iterator[dict]:
    """One row per asset for listings: name, kind, present, size on disk, path."""
    for a in (manifest or load_manifest()).values():
        yield {"name": a.name, "kind": a.kind, "label": a.label, "present": a.present,
               "bytes": a.path.stat().st_size if a.present else None, "path": str(a.path), "url": a.url}
