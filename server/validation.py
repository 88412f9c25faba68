"""Checks a client's reply before it may touch the global model. Plain Python, testable alone."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from common import protocol

EXAMPLES_SLACK = 1.1  # a board may gain a few images mid-run, not multiply them
# A board clips in float32, landing within a few ulps of dp-clipping-norm: this much over is allowed.
CLIP_TOLERANCE = 1e-4
# A node seen for the first time may claim at most this many times the round's median
# num-examples (of at least EXAMPLES_MEDIAN_MINIMUM claims): as generous as max-update-ratio,
# since honest non-IID boards differ (ELPV at Dirichlet 0.3 over 30 boards: a few x the median).
EXAMPLES_MEDIAN_RATIO = 100.0
EXAMPLES_MEDIAN_MINIMUM = 3


def number(value: object) -> float:
    """A metric value as a float; anything that is not a single number counts as 0."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def is_number(value: object) -> bool:
    """A single finite number (not a bool, not a list)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def metrics_reject_reason(metrics: Mapping[str, object], required: tuple[str, ...]) -> str | None:
    """Why a reply's metrics cannot be used, or None: every ``required`` key a finite number,
    every count (``protocol.COUNT_METRICS``) it makes finite, non-negative and believable, and
    every metric the protocol gives a range (``protocol.METRIC_RANGES``: scores in [0, 1],
    seconds below a week, ...) inside it. (An infinite count once raised in the server's
    bookkeeping; 1e308 seconds summed to inf and broke the dashboard.) Metrics the server does
    not know are never used, and only finite ones are logged."""
    for key in required:
        if not is_number(metrics.get(key)):
            return f"metric {key!r} must be a finite number, got {metrics.get(key)!r}"
    for key in protocol.COUNT_METRICS:
        value = metrics.get(key, 0)
        if not is_number(value) or not 0 <= float(value) < protocol.COUNT_LIMIT:  # type: ignore[arg-type]
            return f"count {key!r} must be a non-negative number below {protocol.COUNT_LIMIT:g}, got {value!r}"
    for key, (low, high) in protocol.METRIC_RANGES.items():
        if key in metrics:
            value = metrics[key]
            if not is_number(value) or not low <= float(value) <= high:  # type: ignore[arg-type]
                return f"metric {key!r} must be a number in [{low:g}, {high:g}], got {value!r}"
    return None


def examples_reject_reason(
    metrics: Mapping[str, object], max_examples: int, examples_before: int | None = None, embedded: bool = True
) -> str | None:
    """Why a reply's ``num-examples`` (checked to be an integer) is not believable, or None: above
    the run's ``max-num-examples``, above what the node first reported in this phase by more
    than ``EXAMPLES_SLACK``, or above the images it says it embedded (its own
    ``embeddings-computed`` + ``embeddings-cached``, train and test shares together) where the
    reply's work embedded its images (``embedded``; a counts-only reply embeds nothing). Every
    count buys a node weight in the average: a claim of 10^15 once owned FedAvg's."""
    claimed = number(metrics.get(protocol.NUM_EXAMPLES))
    if claimed > max_examples:
        return f"num-examples {claimed:.0f} is above max-num-examples={max_examples}"
    if examples_before is not None and claimed > examples_before * EXAMPLES_SLACK:
        return f"num-examples {claimed:.0f} is above the {examples_before} this node first reported"
    held = number(metrics.get(protocol.EMBEDDINGS_COMPUTED)) + number(metrics.get(protocol.EMBEDDINGS_CACHED))
    if embedded and claimed > held:
        return f"num-examples {claimed:.0f} is more than the {held:.0f} images the node says it embedded"
    return None


def examples_bounds(
    claims: Mapping[int, int], unseen: set[int], ratio: float = EXAMPLES_MEDIAN_RATIO
) -> dict[int, str]:
    """Nodes (of ``unseen``: first reply in this phase) whose ``num-examples`` is more than
    ``ratio`` times the median of the round's positive claims; needs at least
    ``EXAMPLES_MEDIAN_MINIMUM`` of them. Later replies are held to a node's first claim."""
    positive = [claim for claim in claims.values() if claim > 0]
    if len(positive) < EXAMPLES_MEDIAN_MINIMUM:
        return {}
    median = float(np.median(positive))
    return {
        node: f"num-examples {claim} is {claim / median:.0f}x the round's median {median:g} (at most "
        f"{ratio:g}x for a node's first reply)"
        for node, claim in claims.items()
        if node in unseen and claim > ratio * median
    }


def reject_reason(
    arrays: Mapping[str, np.ndarray] | None,
    metrics: Mapping[str, object],
    reply_fingerprint: object,
    expected_shapes: Mapping[str, tuple[int, ...]] | None,
    expected_fingerprint: str,
    max_norm: float = 1e4,
    examples_before: int | None = None,
    max_examples: int = 1_000_000,
    embedded: bool = True,
    start: Mapping[str, np.ndarray] | None = None,
) -> str | None:
    """Why this reply must not be aggregated, or None if it may.

    ``expected_shapes`` is None for evaluation replies, which carry no arrays. How far an update
    moved the head, and how a node's first ``num-examples`` compares with the round's, are
    checked for the whole round at once (``update_bounds``, ``examples_bounds``).
    ``examples_before`` is what this node reported in its first reply of this phase: a count
    above it by more than ``EXAMPLES_SLACK`` is an inflated claim, which would buy the node a
    larger weight in the average (``examples_reject_reason``). ``max_norm`` bounds how far each
    array's norm may grow beyond the round's starting head's (``start``; from zero without it):
    a closed-form head can start with norms in the tens of thousands (LDA on tight classes),
    and its honest updates must pass.
    """
    if reply_fingerprint != expected_fingerprint:
        return (
            f"backbone fingerprint {str(reply_fingerprint)[:12]!r} differs from the run's {expected_fingerprint[:12]!r}"
        )
    num_examples = metrics.get(protocol.NUM_EXAMPLES)
    if (
        isinstance(num_examples, bool)
        or not isinstance(num_examples, int | float)
        or not math.isfinite(num_examples)
        or num_examples != int(num_examples)
    ):
        return f"num-examples must be an integer, got {num_examples!r}"
    if num_examples < 0 or (expected_shapes is not None and num_examples == 0):
        return f"num-examples must be positive, got {num_examples}"
    reason = examples_reject_reason(metrics, max_examples, examples_before, embedded)
    if reason is not None or expected_shapes is None:
        return reason
    return head_reject_reason(arrays, expected_shapes, max_norm, start)


def head_reject_reason(
    arrays: Mapping[str, np.ndarray] | None,
    expected_shapes: Mapping[str, tuple[int, ...]],
    max_norm: float,
    start: Mapping[str, np.ndarray] | None = None,
) -> str | None:
    """Why a train reply's head arrays cannot be averaged in, or None: exactly the head's names,
    float32, its shapes, finite, and no array's norm more than ``max_norm`` above the round's
    starting head's (``start``)."""
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
        start_norm = float(np.linalg.norm(start[name])) if start is not None and name in start else 0.0
        if norm > start_norm + max_norm:
            return (
                f"array {name!r} has norm {norm:.3g}, more than max-weight-norm={max_norm:.3g} above the round's "
                f"starting head ({start_norm:.3g})"
            )
    return None


def update_norm(arrays: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the whole update (all arrays together): how far a client moved the head."""
    return math.sqrt(sum(float(np.sum((arrays[n].astype(np.float64) - start[n]) ** 2)) for n in start))


def update_bounds(
    norms: Mapping[int, float], max_norm: float, max_ratio: float, minimum: int = 5, clipping_norm: float = 0.0
) -> dict[int, str]:
    """Updates (by node) that moved the head more than ``max_norm``, or more than ``max_ratio``
    times the round's median update did; 0 turns either check off. In a DP run (``clipping_norm``
    > 0) an update over the clipping norm is refused (its board did not clip), and the ratio is
    not checked: clipping bounds every update already, and a verdict that depends on the other
    updates' norms would let one node's data decide whether another's update counts, which the
    noise is not calibrated to (server/dp.py).

    A fixed bound alone cannot fit every round: honest updates shrink as the learning rate decays, so
    a 1000x-scaled update late in a run can be smaller than an honest one early on. Relative to
    the median it stands out in any round. The ratio is generous (100 by default) because honest
    clients differ too: with one-class clients, a minority client's honest update was measured
    at 27x the majority's. The ratio needs at least ``minimum`` updates for a median worth trusting.
    """
    reasons = {
        node: f"update norm {norm:.3g} is above max-update-norm={max_norm:.3g}"
        for node, norm in norms.items()
        if max_norm > 0 and norm > max_norm
    }
    if clipping_norm > 0:
        for node, norm in norms.items():
            if node not in reasons and norm > clipping_norm * (1 + CLIP_TOLERANCE):
                reasons[node] = (
                    f"update norm {norm:.6g} is above dp-clipping-norm={clipping_norm:g}: the node did not clip "
                    "its update (is it the same edgesplit version?)"
                )
        return reasons
    if max_ratio <= 0 or len(norms) < minimum:
        return reasons
    median = float(np.median(list(norms.values())))
    for node, norm in norms.items():
        if node not in reasons and median > 0 and norm > max_ratio * median:
            reasons[node] = (
                f"update norm {norm:.3g} is {norm / median:.0f}x the round's median {median:.3g} "
                f"(max-update-ratio={max_ratio:g})"
            )
    return reasons


def class_stats_reject_reason(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why a FedNCM reply (per-class feature sums and counts, ``ClassStats.shapes``) must not be
    used, or None.

    The classifier's input features have norm sqrt(feature_dim) exactly (PowerNorm), so no
    honest class mean is longer than that: a longer one is a forged or broken reply.
    """
    reason = statistics_reason(arrays, shapes, "class statistics")
    if reason is not None:
        return reason
    sums, counts = arrays["sums"].astype(np.float64), arrays["counts"].astype(np.float64)
    lengths = np.linalg.norm(sums, axis=1)
    if np.any(lengths > counts * math.sqrt(sums.shape[1]) * (1 + 1e-3)):
        return "a class mean is longer than any normalised feature can be"
    return None


def ridge_stats_reject_reason(
    arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], feature_bound: float = 0.0
) -> str | None:
    """Why a Fed3R reply (``RidgeStats``: a Gram matrix's upper triangle, class sums, counts) must
    not be added in, or None. What any honest client's sums satisfy: finite, the right shapes,
    counts non-negative integers, a Gram matrix with a non-negative diagonal whose entries obey
    Cauchy-Schwarz (|G_ij| <= sqrt(G_ii G_jj)), a trace no larger than the count times the
    largest squared norm one image's z can have (``feature_bound``; 0: unchecked), and class sums
    no longer than the count times the Gram's trace allows (|s_c|^2 <= n_c trace(G)). One board's
    statistics can then weigh in at most as many images as it counts."""
    from common.protocol import RidgeStats

    reason = statistics_reason(arrays, shapes, "ridge statistics")
    if reason is not None:
        return reason
    counts = arrays["counts"].astype(np.float64)
    if counts.sum() == 0:
        return "ridge statistics of no examples"
    gram = RidgeStats.from_arrays(arrays).full_gram()
    diagonal = np.diag(gram)
    slack = 1e-3 * max(float(diagonal.max()), 1e-12)  # float32 rounding of the sums
    if np.any(diagonal < -slack):
        return "the Gram matrix has a negative diagonal entry"
    if feature_bound > 0 and float(np.trace(gram)) > counts.sum() * feature_bound * (1 + 1e-3) + slack:
        return f"the Gram matrix's trace is more than {counts.sum():.0f} images' features can sum to"
    bound = np.sqrt(np.outer(np.maximum(diagonal, 0), np.maximum(diagonal, 0)))
    if np.any(np.abs(gram) > bound * (1 + 1e-3) + slack):
        return "the Gram matrix is not a sum of outer products (an entry breaks Cauchy-Schwarz)"
    lengths = np.sum(arrays["sums"].astype(np.float64) ** 2, axis=1)
    if np.any(lengths > counts * float(np.trace(gram)) * (1 + 1e-3) + slack):
        return "a class sum is longer than the Gram matrix allows"
    return None


def statistics_reason(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], what: str) -> str | None:
    """What every one-shot statistics reply must be, or why it is not: exactly the declared arrays
    in their shapes, finite, and counts that are non-negative whole numbers, believable in total."""
    if set(arrays) != set(shapes):
        return f"{what} must be exactly {sorted(shapes)}, got {sorted(arrays)}"
    for name, shape in shapes.items():
        if tuple(arrays[name].shape) != tuple(shape):
            return f"array {name!r} has shape {tuple(arrays[name].shape)}, expected {tuple(shape)}"
        if not np.all(np.isfinite(arrays[name])):
            return f"array {name!r} contains NaN or Inf"
    counts = arrays["counts"].astype(np.float64)
    if np.any(counts < 0) or np.any(counts != np.round(counts)) or counts.sum() >= protocol.COUNT_LIMIT:
        return "class counts must be non-negative integers, believable in total"
    return None
