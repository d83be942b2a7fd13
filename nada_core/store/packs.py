"""Starter packs: named groups of manifest assets that unlock a first run (``packs`` in
weights/manifest.json), their download sizes asked from the servers before anything is fetched, and
one download with a single combined progress."""
from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Callable

from . import weights


@dataclass(frozen=True)
class Pack:
    name: str
    label: str
    assets: tuple[str, ...]
    unlocks: str


def load_packs() -> dict[str, Pack]:
    data = json.loads(weights.MANIFEST_PATH.read_text()).get("packs", {})
    return {n: Pack(n, p["label"], tuple(p["assets"]), p["unlocks"]) for n, p in data.items()}


def missing_assets(pack: Pack) -> list[weights.Asset]:
    manifest = weights.load_manifest()
    return [manifest[n] for n in pack.assets if n in manifest and not manifest[n].present]


_SIZE_CACHE: dict[str, int | None] = {}


def remote_size(asset: weights.Asset, timeout: float = 5.0) -> int | None:
    """The file's size from the manifest, else from the server's Content-Length (a HEAD request,
    remembered); None when unknown or offline."""
    if asset.size is not None:
        return asset.size
    if not asset.url:
        return None
    if asset.url not in _SIZE_CACHE:
        try:
            req = urllib.request.Request(asset.url, method="HEAD", headers={"User-Agent": "nada-studio/1"})
            with urllib.request.urlopen(req, timeout=timeout) as r:
                n = r.headers.get("X-Linked-Size") or r.headers.get("Content-Length")
                _SIZE_CACHE[asset.url] = int(n) if n else None
        except (OSError, ValueError):
            return None  # not remembered: the next look may be online
    return _SIZE_CACHE[asset.url]


def pack_size(pack: Pack) -> tuple[int, int]:
    """(bytes still to fetch for the missing files whose size is known, number of files of unknown size)."""
    total, unknown = 0, 0
    for a in missing_assets(pack):
        n = remote_size(a)
        total, unknown = (total + n, unknown) if n is not None else (total, unknown + 1)
    return total, unknown


def download_pack(pack: Pack, progress: Callable[[float, str], None] | None = None) -> list[str]:
    """Fetch every missing file of the pack; ``progress(fraction, text)`` covers the whole pack
    (weighted by size where known). Returns the names fetched. Stops at the first failure, keeping
    finished files and the resumable part of the failed one."""
    todo = missing_assets(pack)
    sizes = [remote_size(a) or 0 for a in todo]
    grand = sum(sizes) or len(todo) or 1
    done_before = 0
    fetched = []
    for i, (asset, size) in enumerate(zip(todo, sizes)):
        def report(done, total, asset=asset, size=size, i=i, before=done_before):
            if progress:
                part = done if sum(sizes) else (done / total if total else 0)
                progress(min(1.0, (before + part) / grand),
                         f"{asset.name} ({i + 1}/{len(todo)}): {done >> 20} MiB" + (f" of {total >> 20} MiB" if total else ""))
        if asset.extra.get("package"):
            raise weights.WeightsError(f"{asset.label or asset.name} is missing: {asset.how_to_get()}.")
        weights.download(asset, progress=report)
        fetched.append(asset.name)
        done_before += size if sum(sizes) else 1
    if progress:
        progress(1.0, f"{len(fetched)} file(s) downloaded")
    return fetched
