"""What a secure sum adds up, in plain NumPy: the fixed-point encoding of a board's part, the order of
its arrays, the bound each board holds its own part to, and who shares keys with whom.

The protocol itself is Flower's SecAgg+ (common/flower_glue.py; the board's side in
client/secure_sum.py, the server's in server/secure_sum.py). It sums integers modulo 2**62, so
every part is encoded as fixed point with 20 fractional bits (a resolution of 1e-6, finer than the
float32 a clear reply carries for the statistics' magnitudes) in two's complement, and the sum is
decoded the same way. A sum wraps if its true value leaves (-2**41, 2**41); each honest board
keeps its own part within that range divided by the number of boards, so that honest parts never
wrap, and says so (a refusal) rather than send a part that would.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np

MOD_BITS = 62
FRACTION_BITS = 20
MOD_RANGE = 1 << MOD_BITS
SCALE = 1 << FRACTION_BITS
LARGEST_SUM = float(1 << (MOD_BITS - 1 - FRACTION_BITS))  # |a sum| must stay below this
# SecAgg+ shares each board's secrets with this many boards (itself included): all of them in a
# smaller sum, a ring of neighbours in a larger one (Flower's SecAgg+ graph; odd, as it asks).
DEFAULT_SHARES = 15
# What a train reply's part holds beside the weighted head: the weight and the weighted metrics.
WEIGHT = "~weight"
WEIGHTED_METRICS = ("~train-loss", "~train-accuracy")
NUM_EXAMPLES = "~num-examples"  # a statistics reply's part: its images, beside its statistics


def encode(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Each part as int64 fixed point in [0, MOD_RANGE) (two's complement modulo 2**62)."""
    return [np.mod(np.rint(np.asarray(p, dtype=np.float64) * SCALE).astype(np.int64), MOD_RANGE) for p in parts]


def decode(integers: list[np.ndarray]) -> list[np.ndarray]:
    """A sum of encoded parts, back to float64."""
    half = MOD_RANGE >> 1
    return [np.where(i >= half, i - MOD_RANGE, i).astype(np.float64) / SCALE for i in integers]


def part_limit(boards: int) -> float:
    """The largest magnitude one board's values may have so that a sum over ``boards`` such parts
    cannot wrap."""
    return LARGEST_SUM / max(boards, 1)


def part_problem(parts: Mapping[str, np.ndarray], boards: int) -> str | None:
    """Why these values may not go into a secure sum over ``boards`` boards, or None."""
    limit = part_limit(boards)
    for name, values in parts.items():
        values = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            return f"{name} has values that are not finite"
        largest = float(np.max(np.abs(values))) if values.size else 0.0
        if largest >= limit:
            return f"{name} reaches {largest:.3g}, beyond the {limit:.3g} a part of a sum over {boards} boards may hold"
    return None


def ordered(parts: Mapping[str, np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    """A part's names and arrays in the order both sides use: by name."""
    names = sorted(parts)
    return names, [np.asarray(parts[n]) for n in names]


def weighted_train_part(
    head: Mapping[str, np.ndarray], weight: float, metrics: Mapping[str, float]
) -> dict[str, np.ndarray]:
    """A train reply as a part of the federation's weighted sum: weight x each head array, the
    weight, and weight x the averaged metrics (training loss and accuracy)."""
    part = {name: weight * np.asarray(a, dtype=np.float64) for name, a in head.items()}
    part[WEIGHT] = np.array([weight])
    for key in WEIGHTED_METRICS:
        part[key] = np.array([weight * float(metrics.get(key[1:], 0.0))])
    return part


def train_part_shapes(head_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The names and shapes of a train reply's part."""
    return {**dict(head_shapes), WEIGHT: (1,), **{key: (1,) for key in WEIGHTED_METRICS}}


def statistics_part_shapes(stats_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The names and shapes of a statistics reply's part."""
    return {**dict(stats_shapes), NUM_EXAMPLES: (1,)}


def share_count(boards: int, shares: int = DEFAULT_SHARES) -> int:
    """How many boards each board shares its secrets with (itself included): all of them up to
    ``shares``, else ``shares`` made odd."""
    if boards <= shares:
        return boards
    return shares if shares % 2 else shares + 1


def threshold_of(share_number: int) -> int:
    """The shares needed to rebuild a secret: a strict majority, so that no server can collect both
    a board's mask seed and its key (it would need a majority of its neighbours to say it both
    stayed and dropped)."""
    return share_number // 2 + 1


def neighbours_of(nodes: list[int], share_number: int, seed: int) -> dict[int, set[int]]:
    """Who shares secrets with whom (each node with itself included): every node with every other
    when ``share_number`` covers them, else a ring of ``share_number`` over the nodes in an order
    drawn from ``seed`` (Flower's SecAgg+ graph)."""
    order = sorted(nodes)
    random.Random(seed).shuffle(order)
    half, count = share_number // 2, len(order)
    if share_number >= count:
        return {node: set(order) for node in order}
    return {node: {order[(i + k) % count] for k in range(-half, half + 1)} for i, node in enumerate(order)}
