"""Named assets from ``weights/manifest.json``: where they live, whether they are there, and downloads.

Downloads resume from ``<file>.part`` with an HTTP Range request, report progress, check size and
sha256 where the manifest pins them, and are renamed onto the final name only once complete, so a
half file never sits under the real name. Without network the error says which file is missing,
its URL and where to put it by hand.
"""
from __future__ import annotations

import errno
import functools
import http.client
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST_PATH = REPO_ROOT / "weights" / "manifest.json"
CHUNK = 1 << 20

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


def verify(asset: Asset) -> str:
    """'missing', 'ok' (checksum matched), 'unverified' (nothing pinned), or 'size mismatch'/'sha256 mismatch'."""
    if not asset.present:
        return "missing"
    if asset.size is not None and asset.path.stat().st_size != asset.size:
        return "size mismatch"
    prefix = asset.extra.get("sha256_prefix")  # torchvision-style: the file name carries the hash's start
    if asset.sha256 is None and prefix is None:
        return "unverified"
    digest = sha256_of(asset.path)
    return "ok" if digest == asset.sha256 or (asset.sha256 is None and digest.startswith(prefix)) else "sha256 mismatch"


def _open(url: str, start: int, timeout: float):
    req = urllib.request.Request(url, headers={"User-Agent": "nada-studio/1", **({"Range": f"bytes={start}-"} if start else {})})
    return urllib.request.urlopen(req, timeout=timeout)


def download(asset: Asset, progress: Progress | None = None, timeout: float = 30.0, url: str | None = None) -> Path:
    """Fetch ``asset`` to its path (resuming a ``.part`` left by an earlier try) and verify it."""
    if asset.extra.get("package"):
        if asset.present:
            return asset.path
        raise WeightsError(f"{asset.label or asset.name} is missing: {asset.how_to_get()}.")
    dest = asset.path
    if dest.is_file() and verify(asset) in ("ok", "unverified"):
        return dest
    url = url or asset.url
    if url and os.environ.get("HF_ENDPOINT") and url.startswith("https://huggingface.co/"):
        url = os.environ["HF_ENDPOINT"].rstrip("/") + url[len("https://huggingface.co"):]  # a mirror, as huggingface_hub does
    if not url:
        raise WeightsError(f"{asset.name} has no download URL; place the file at {dest}.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, start, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the part already holds every byte
            resp = None
        else:
            raise WeightsError(f"download of {asset.name} failed: {url} answered HTTP {e.code} {e.reason}. "
                               f"Get the file elsewhere and save it as {dest}.") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise WeightsError(f"cannot reach {url} ({reason}); this machine looks offline. "
                           f"Download {asset.name} by hand from that URL and save it as {dest}, "
                           f"then run `python -m nada_core weights verify`.") from None
    try:
        if resp is not None:
            with resp:
                if start and resp.status != 206:
                    start = 0  # server ignored the Range header: start over
                length = resp.headers.get("Content-Length")
                total = (start + int(length)) if length is not None else asset.size
                done = start
                with open(part, "ab" if start else "wb") as out:
                    for chunk in iter(lambda: resp.read(CHUNK), b""):
                        out.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
                if total is not None and done < total:
                    raise WeightsError(f"download of {asset.name} was cut off at {done} of {total} bytes; "
                                       f"run the download again to resume from {part}.")
    except (OSError, http.client.HTTPException) as e:
        if getattr(e, "errno", None) == errno.ENOSPC:
            free = shutil.disk_usage(dest.parent).free
            raise WeightsError(f"disk full while saving {asset.name} to {dest.parent} ({free >> 20} MiB free); "
                               f"free some space and download again: it resumes from {part}.") from None
        raise WeightsError(f"download of {asset.name} was interrupted ({e}); run it again to resume from {part}.") from None
    size = part.stat().st_size
    if asset.size is not None and size != asset.size:
        part.unlink()
        raise WeightsError(f"{asset.name}: got {size} bytes, expected {asset.size}; the partial file was removed, try again.")
    expected, prefix = asset.sha256, asset.extra.get("sha256_prefix")
    got = sha256_of(part) if expected or prefix else None
    if (expected and got != expected) or (prefix and not expected and not got.startswith(prefix)):
        expected = expected or f"{prefix}..."
        part.unlink()
        raise WeightsError(f"{asset.name}: sha256 mismatch (got {got[:12]}..., expected {expected[:12]}...); "
                           "the file was removed. The source may have changed or the transfer was corrupted.")
    os.replace(part, dest)
    return dest


def status_rows(manifest: dict[str, Asset] | None = None) -> Iterator[dict]:
    """One row per asset for listings: name, kind, present, size on disk, path."""
    for a in (manifest or load_manifest()).values():
        yield {"name": a.name, "kind": a.kind, "label": a.label, "present": a.present,
               "bytes": a.path.stat().st_size if a.present else None, "path": str(a.path), "url": a.url}
