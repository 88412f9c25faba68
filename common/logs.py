"""Logging set-up for the server and client processes (no Flower import: it goes by logger name)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

FLOWER_LOGGER_NAME = "flwr"  # Flower's logger; `flwr run --stream` shows what its handlers print


def configure_logging(level: int = logging.INFO) -> None:
    """Send edgesplit's log records through Flower's handlers, so they stream with Flower's own."""
    flower_handlers = logging.getLogger(FLOWER_LOGGER_NAME).handlers
    for name in ("common", "client", "server"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for handler in flower_handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.propagate = not flower_handlers  # without Flower, fall back to the root logger


@contextlib.contextmanager
def quiet_root_logger(level: int = logging.WARNING) -> Iterator[None]:
    """Raise the root logger's level for a block (libraries that log every detail at INFO)."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(level, previous))
    try:
        yield
    finally:
        root.setLevel(previous)
