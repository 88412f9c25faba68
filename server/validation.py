"""Checks a client's reply before it may touch the global model. Plain Python, testable alone."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from common import wire


def reject_reason(
    arrays: Mapping[str, np.ndarray] | None,
    metrics: Mapping[str, object],
    reply_fingerprint: object,
    expected_shapes: Mapping[str, tuple[int, ...]] | None,
    expected_fingerprint: str,
    max_norm: float = 1e4,
) -> str | None:
    """Why this reply must not be aggregated, or None if it may.

    ``expected_shapes`` is None for evaluation replies, which carry no arrays.
    """
    if reply_fingerprint != expected_fingerprint:
        return (
            f"backbone fingerprint {str(reply_fingerprint)[:12]!r} differs from the run's {expected_fingerprint[:12]!r}"
        )
    num_examples = metrics.get(wire.NUM_EXAMPLES)
    if (
        isinstance(num_examples, bool)
        or not isinstance(num_examples, int | float)
        or not math.isfinite(num_examples)
        or num_examples != int(num_examples)
    ):
        return f"num-examples must be an integer, got {num_examples!r}"
    if expected_shapes is None:
        return None
    if num_examples <= 0:
        return f"num-examples must be positive, got {num_examples}"
    if arrays is None:
        return "reply carries no head arrays"
    if set(arrays) != set(expected_shapes):
        return f"array names {sorted(arrays)} differ from the head's {sorted(expected_shapes)}"
    for name, shape in expected_shapes.items():
        array = arrays[name]
        if array.dtype != np.float32:
            return f"array {name!r} has dtype {array.dtype}, expected float32"
        if tuple(array.shape) != tuple(shape):
            return f"array {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}"
        if not np.all(np.isfinite(array)):
            return f"array {name!r} contains NaN or Inf"
        norm = float(np.linalg.norm(array))
        if norm > max_norm:
            return f"array {name!r} has norm {norm:.3g}, above the bound {max_norm:.3g}"
    return None
