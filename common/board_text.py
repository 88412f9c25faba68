"""Text a board chose (status fields, error reasons, metric names, its SuperNode's name), made safe
for the server to log, store and show: control and format characters (newlines, terminal escapes,
bidirectional overrides, zero-width marks) become spaces, runs of white space one space, and the
length is capped. A board can then neither forge log lines, nor hide text in the dashboard, nor
fill the run folder."""

from __future__ import annotations

import unicodedata

MAX_BOARD_TEXT = 1000  # characters; what a board's own privacy guard lets a status string carry
MAX_BOARD_NAME = 100  # metric names, SuperNode names


def board_text(value: object, limit: int = MAX_BOARD_TEXT) -> str:
    """``value`` as one line of at most ``limit`` characters without control or format characters."""
    raw = str(value)
    text = " ".join("".join(" " if _is_control(c) else c for c in raw[: 4 * limit]).split())
    if len(text) > limit or len(raw) > 4 * limit:
        return text[: limit - 1].rstrip() + "…"
    return text


def _is_control(character: str) -> bool:
    """Unicode's "other" categories (control, format, surrogate, private use, unassigned) and the
    line and paragraph separators."""
    return unicodedata.category(character)[0] == "C" or character in "\u2028\u2029"
