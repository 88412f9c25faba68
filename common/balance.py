"""Class balance from the federation's class counts (plain NumPy, used by both heads).

ELPV's middle defect levels are rare, and a head trained on plain cross-entropy rarely predicts
them. Two remedies, both from the global class prior that the one-shot statistics (FedNCM's or
Fed3R's counts) give the server, never from its held-out set:

- ``weighted``: each example's loss weighted by 1 / (classes x prior of its class), so every
  class weighs the same in total (weights average 1 over the data);
- ``logit-adjusted`` (Menon et al., ICLR 2021): train on logits + tau log(prior), predict on the
  plain logits, which then estimate the balanced posterior.

And one remedy for label skew across clients (``local-prior-correction``): a client trains on
logits + log(its own class shares) - log(the federation's). The head still estimates the posterior
under the federation's prior, but a client's own prior no longer pulls its update toward its own
classes, and a class it lacks drops out of its softmax (as in FedRS). Under label skew plain
FedAvg drifts toward each client's classes; with the correction every client fits the same
class-conditional scores (a client holding a single class learns nothing from it: one class alone
says nothing about how it differs from the others).
"""

from __future__ import annotations

import numpy as np

from common.kinds import ClassBalance, kind_values


def class_prior(counts: np.ndarray) -> np.ndarray:
    """The class shares of ``counts`` (uniform if there are none)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return counts / total if total > 0 else np.full(len(counts), 1 / max(len(counts), 1))


def log_prior(prior: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """log(prior) per class, and 0 for a class no client reported: adjusting by its log prior would
    add an unbounded boost (post hoc) to a class the federation holds no example of."""
    shares = np.asarray(prior, dtype=np.float64)
    return np.log(shares, out=np.zeros_like(shares), where=shares > 0)


def balance_terms(
    method: ClassBalance, prior: tuple[float, ...] | np.ndarray, tau: float = 1.0
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(per-class loss weights, per-class logit offsets) for training: None where not used."""
    if method == ClassBalance.NONE or len(prior) == 0:
        return None, None
    shares = np.asarray(prior, dtype=np.float64)
    if method == ClassBalance.WEIGHTED:
        present = shares > 0
        weights = np.zeros_like(shares)
        weights[present] = 1 / (present.sum() * shares[present])
        return weights.astype(np.float32), None
    if method == ClassBalance.LOGIT_ADJUSTED:
        return None, (tau * log_prior(shares)).astype(np.float32)
    raise ValueError(f"Unknown class balance {method!r}; use one of {kind_values(ClassBalance)}.")


# The offset of a class a client holds no example of: out of its softmax (exp underflows to 0 in
# float32), so its local training neither pushes that class down nor moves its weights.
ABSENT_CLASS_OFFSET = -1e4


def local_prior_offsets(local_counts: np.ndarray, prior: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """log(local share) - log(federation share) per class: what a client adds to its logits so that
    it trains the federation's head on its own label distribution (``local-prior-correction``)."""
    counts = np.asarray(local_counts, dtype=np.float64)
    local = class_prior(counts)
    offsets = np.log(local, out=np.full_like(local, ABSENT_CLASS_OFFSET), where=counts > 0) - log_prior(prior)
    return offsets.astype(np.float32)


def training_offsets(
    method: ClassBalance, prior: tuple[float, ...] | np.ndarray, tau: float, local_counts: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``balance_terms``, with the local-prior correction added to the offsets when the client's
    class counts are given (and the federation's prior known)."""
    weights, offsets = balance_terms(method, prior, tau)
    if local_counts is None or len(prior) == 0:
        return weights, offsets
    correction = local_prior_offsets(local_counts, prior)
    return weights, correction if offsets is None else offsets + correction


def posthoc_offsets(method: ClassBalance, prior: tuple[float, ...] | np.ndarray, tau: float = 1.0) -> np.ndarray | None:
    """What a classifier fitted without balance subtracts from its logits to predict as a balanced
    one would (post-hoc logit adjustment): tau log(prior), tau = 1 for ``weighted`` (the balanced
    error's Bayes rule divides the posterior by the prior)."""
    if method == ClassBalance.NONE or len(prior) == 0:
        return None
    strength = 1.0 if method == ClassBalance.WEIGHTED else tau
    return (strength * log_prior(prior)).astype(np.float32)
