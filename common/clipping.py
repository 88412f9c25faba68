"""An update's L2 norm and its clipping, in NumPy: the board clips its update before it leaves
(client/dp_clipping.py), and the server holds a DP run's updates to the same bound. The same
arithmetic as Flower's fixed clipping (``flwr.clientapp.mod.fixedclipping_mod``): scale the
update, all arrays together, by min(1, C / its norm)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def update_norm(arrays: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of ``arrays - start`` over every array together."""
    squares = sum(float(np.sum(np.square(np.subtract(arrays[name], start[name], dtype=np.float64)))) for name in start)
    return float(np.sqrt(squares))


def clip_update(
    arrays: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], clipping_norm: float
) -> dict[str, np.ndarray]:
    """``arrays`` moved back towards ``start`` so that the update's L2 norm (over all arrays) is at
    most ``clipping_norm``; an update within it is returned as it is."""
    norm = update_norm(arrays, start)
    if norm <= clipping_norm:  # also an update of 0, which a scale would divide by
        return dict(arrays)
    scale = clipping_norm / norm
    return {
        name: (start[name] + (np.asarray(arrays[name], np.float64) - start[name]) * scale).astype(
            np.asarray(arrays[name]).dtype
        )
        for name in start
    }
