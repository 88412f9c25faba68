"""Faults a simulated client commits on purpose, so that scenario runs and tests can show what
the server does about them. Set by run-config ``fault-clients`` (by partition id),
``fault-dropout`` and ``fault-delay``; a client without a partition id (a real board) commits none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np

from common.config import RunConfig

log = logging.getLogger(__name__)

SCALE = 1000.0  # a "scaled-update" client sends global + SCALE * (its honest update)


class InjectedFault(RuntimeError):
    """A failure this client was told to commit (a crash or a dropout)."""


def fault_of(config: RunConfig, partition_id: int | None, server_round: int) -> str | None:
    """The fault this client commits in this round, if any; dropouts are drawn per round from
    the run's seed, so a scenario is reproducible."""
    if partition_id is None:
        return None
    if config.fault_dropout > 0:
        draw = np.random.default_rng([config.seed, server_round, partition_id, 0xD809]).random()
        if draw < config.fault_dropout:
            return "dropout"
    return config.faults().get(partition_id)


def before_work(fault: str | None, config: RunConfig) -> None:
    """Faults that happen before any work: dying, dropping out, or being slow."""
    if fault in ("crash", "dropout"):
        raise InjectedFault(f"injected fault: {fault}")
    if fault == "straggle":
        log.info("injected fault: sleeping %.1fs before replying", config.fault_delay)
        time.sleep(config.fault_delay)


def flip_labels(fault: str | None, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """A label-flipping client trains on class ``C - 1 - y`` instead of ``y``."""
    return (num_classes - 1 - labels) if fault == "label-flip" else labels


def poison(
    fault: str | None, trained: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The arrays a poisoning client sends instead of its honest result."""
    if fault == "nan-update":
        return {name: np.full_like(value, np.nan) for name, value in trained.items()}
    if fault == "scaled-update":
        return {
            name: (start[name] + SCALE * (value - start[name])).astype(np.float32) for name, value in trained.items()
        }
    return dict(trained)
