"""Logging set-up shared by the server and client processes."""

from __future__ import annotations

import logging


def configure_logging(level: int = logging.INFO) -> None:
    """Send edgesplit's log records through Flower's logger, which `flwr run --stream` shows."""
    from flwr.supercore.logger import FLOWER_LOGGER

    for name in ("common", "client", "server"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(h in logger.handlers for h in FLOWER_LOGGER.handlers):
            for handler in FLOWER_LOGGER.handlers:
                logger.addHandler(handler)
        logger.propagate = False
