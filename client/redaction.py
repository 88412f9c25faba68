"""Text leaving a board without the board's own paths: where its images and caches live, and any
other file path an error message may quote, say something about the site (a user's name, a
customer's folder) that the server does not need to know why a board failed. The board's own log
keeps the detail. Plain Python."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

LOCAL_PATH = "<board path>"
# Config keys that name a folder on the board (node config and run config alike).
PATH_KEYS = ("data-dir", "cache-dir", "server-test-dir")
# A path no configured folder accounts for: absolute (POSIX, or a Windows drive), or in a home
# folder; a "/" inside a word ("p1/3", "and/or") is not one.
OTHER_PATH = r"(?:~[\\/]|(?<![\w.])(?:[A-Za-z]:)?[\\/](?=[^\s\\/]))"
PATH_REST = r"[^\s'\"]*"  # what follows the start of a path: the folders and files below it


def local_paths(*configs: Mapping[str, Any]) -> list[str]:
    """The board's folders the configs name, the cache's default and the home folder, each as
    written, expanded and resolved; longest first, so that the most specific is replaced."""
    named = [str(config[key]) for config in configs for key in PATH_KEYS if config.get(key)]
    named += [os.environ.get("EDGESPLIT_CACHE_DIR", ""), str(Path.home())]
    forms = {form for raw in named if raw for form in _forms(raw)}
    return sorted((form for form in forms if len(form) > 1), key=len, reverse=True)


def _forms(raw: str) -> Iterable[str]:
    yield raw
    expanded = Path(raw).expanduser()
    yield str(expanded)
    with contextlib.suppress(OSError, RuntimeError):  # a loop of links: the other forms stand
        yield str(expanded.resolve())


def without_local_paths(text: str, paths: Iterable[str]) -> str:
    """``text`` with each of ``paths``, and any other file path, replaced (with what follows it
    down to the next space or quote) by ``LOCAL_PATH``."""
    known = [rf"(?<![\w.-]){re.escape(path)}(?![\w-])" for path in paths]  # whole names: "data" is not "metadata"
    return re.sub(f"(?:{'|'.join([*known, OTHER_PATH])}){PATH_REST}", LOCAL_PATH, text)
