"""The board's own floor on how many images a shared statistic may sum over: the server's request
can raise it, never lower it. Plain Python: the edge client applies it while it sums, and the
privacy guard (client/privacy.py) checks every reply against it before it leaves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

DEFAULT_MIN_EXAMPLES = 5  # a board's floor when its node config sets none
LEAST_EXAMPLES = 2  # below this a "sum" is one image's features, whatever anyone set


def example_floor(requested: int, node_floor: int | None) -> int:
    """How many images a class (or any group) needs before the board shares a statistic of it:
    the server's request can raise the board's own floor (node config ``min-examples``, 5 if
    unset), never lower it, and nothing goes below 2."""
    return max(requested, node_floor or DEFAULT_MIN_EXAMPLES, LEAST_EXAMPLES)


def node_floor(node_config: Mapping[str, Any]) -> int | None:
    """The board's own floor (node-config ``min-examples``), if it sets one."""
    value = node_config.get("min-examples")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def floor_violations(counts: Any, floor: int) -> list[str]:
    """Classes whose statistics a reply would share from fewer than ``floor`` images."""
    few = [index for index, count in enumerate(np.asarray(counts).ravel()) if 0 < count < floor]
    return [f"statistics of class(es) {few} come from fewer than {floor} images"] if few else []
