"""JSON that others wrote (run records, file metadata, delta headers), refused when too large or too deeply
nested before the parser builds anything: ``json.loads`` holds a 50 MB text whole, and a 100,000-deep list
ends in a RecursionError only after allocating its levels."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

MAX_BYTES = 1 << 20     # a recipe or a file's metadata is a few KB
MAX_DEPTH = 32          # ours nest 4 levels at most

_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')   # brackets inside texts do not count
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")


class JSONRefused(ValueError):
    """JSON that is too large, too deep, not JSON, or not the type expected; the message names what it is."""


def too_deep(text: str, max_depth: int) -> bool:
    """Whether the arrays and objects of ``text`` nest deeper than ``max_depth``, found without parsing: the
    brackets outside strings, with the innermost pairs removed once per level (at C speed, whatever the size)."""
    s = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    if re.search(r"[\[{]{%d}" % (max_depth + 1), s):   # a run of openings that long: no need to count
        return True
    for _ in range(max_depth + 1):
        if not s:
            return False
        inner = _INNERMOST.sub("", s)
        if inner == s:   # unbalanced: not JSON, which the parser then says
            return False
        s = inner
    return True


def loads(text: str | bytes, what: str, expect: type | None = dict, max_bytes: int = MAX_BYTES,
          max_depth: int = MAX_DEPTH):
    """``json.loads(text)`` once ``text`` is at most ``max_bytes`` and ``max_depth`` deep, and of type ``expect``
    (None: any); JSONRefused naming ``what`` otherwise."""
    if len(text) > max_bytes:
        raise JSONRefused(f"{what} is larger than {_size(max_bytes)} ({_size(len(text))})")
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise JSONRefused(f"{what} is not UTF-8 text") from None
    if too_deep(text, max_depth):
        raise JSONRefused(f"{what} nests deeper than {max_depth} levels")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise JSONRefused(f"{what} is not valid JSON ({str(e)[:80]})") from None
    if expect is not None and not isinstance(value, expect):
        raise JSONRefused(f"{what} is {_kind(type(value))} where {_kind(expect)} was expected")
    return value


def load_file(path: str | os.PathLike, what: str | None = None, expect: type | None = dict,
              max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH):
    """``loads`` of a file, whose size is checked before a byte is read (OSError when it cannot be read)."""
    path = Path(path)
    what = what or path.name
    if path.stat().st_size > max_bytes:
        raise JSONRefused(f"{what} is larger than {_size(max_bytes)} ({_size(path.stat().st_size)})")
    with open(path, "rb") as f:
        return loads(f.read(max_bytes + 1), what, expect, max_bytes, max_depth)


def _size(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n >> 10} KiB" if n >= 2 ** 10 else f"{n} bytes"


def _kind(t: type) -> str:
    return {dict: "a JSON object", list: "a JSON array", str: "a JSON text", bool: "a JSON boolean",
            type(None): "JSON null"}.get(t, "a JSON number")
