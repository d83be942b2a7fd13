"""Seconds as text, the one formatter for every ETA and duration (terminal, batch table, app).

A terminal line wants a compact clock (``1:05``, ``1:02:03``) that lines up in columns; a sentence in the app
reads better in words (``1 min 05 s``). Both come from here so a run's time reads the same wherever it is shown.
"""
from __future__ import annotations


def fmt_seconds(seconds: float | None, *, clock: bool = False) -> str:
    """``clock``: ``m:ss`` or ``h:mm:ss``; otherwise words (``45 s``, ``1 min 05 s``, ``2 h 03 min``).
    ``None`` (not known yet) is ``?``."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if clock:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    if s >= 3600:
        return f"{s // 3600} h {s // 60 % 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"
