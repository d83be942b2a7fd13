"""How long the texts users type may be (prompts, edit texts), checked on the server for every entry point: CLIP
reads 77 tokens, so a longer text only costs the server time and memory. Light to import (no CLIP)."""
from __future__ import annotations

MAX_PROMPT_CHARS = 300


def text_problem(text, field: str, limit: int = MAX_PROMPT_CHARS) -> str | None:
    """Why ``text`` cannot be a prompt field's value (not text, or over ``limit`` characters), else None."""
    if text is not None and not isinstance(text, str):
        return f"{field} must be a text"
    if text and len(text) > limit:
        return f"{field} must be at most {limit} characters (got {len(text)})"
    return None
