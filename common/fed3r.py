"""Fed3R (Fani, Camoriano, Caputo, Ciccone, ICML 2024): the federation's ridge classifier in
closed form. Plain NumPy, used by the client (its sums), the server (the solve) and the
in-process benchmarks alike.

With a frozen backbone, ridge regression of one-hot labels on the features z the classifier's
last layer sees has an exact federated solution: each client sends once the sums z z^T (Gram)
and, per class, z and the count; the server adds them and solves. The result is the centralised
ridge classifier whatever the partition and client order (up to float rounding). The bias comes
free: the Gram of [z, 1] needs only the sum of z (the class sums' total) and the count, so it is
fitted unpenalised.

Features are the classifier's own input: PowerNorm'd pooled features for the linear head; for
``head='mlp'`` the ReLU of the first, seeded layer, i.e. random features (the paper's Fed3R-RF),
and the ridge sets the last layer. Each image counts once: its views' outer products are averaged.

The same statistics also give the federation's shrinkage LDA classifier (``solve_lda``): class
means and the within-class covariance are functions of the Gram matrix, the class sums and the
counts. Its scores are Gaussian log-posteriors, so it needs no temperature fitted on held-out
data, and its bias carries the log class prior explicitly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from common.protocol import RidgeStats

ROWS_PER_BATCH = 256  # examples x views per batch, whatever the number of views


def ridge_sums(
    last_inputs: Callable[[np.ndarray], np.ndarray],
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    min_examples: int = 1,
) -> RidgeStats:
    """A client's statistics of (n, views, ...) ``features``: ``last_inputs`` maps a batch of
    single-view features to the (rows, dim) inputs of the classifier's last layer. Classes with
    fewer than ``min_examples`` examples are left out entirely, so no class sum is close to one
    image's features. Sums are taken in float64 and sent as float32."""
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    kept = np.flatnonzero(counts[y] >= min_examples)
    counts[counts < min_examples] = 0.0
    views = features.shape[1]
    gram: np.ndarray | None = None
    sums: np.ndarray | None = None
    step = max(1, ROWS_PER_BATCH // max(views, 1))
    for start in range(0, len(kept), step):
        index = kept[start : start + step]
        batch = features[index]
        z = np.asarray(last_inputs(batch.reshape(-1, *batch.shape[2:])), dtype=np.float64)
        if gram is None or sums is None:
            gram, sums = np.zeros((z.shape[1], z.shape[1])), np.zeros((num_classes, z.shape[1]))
        gram += z.T @ z / views
        np.add.at(sums, y[index], z.reshape(len(index), views, -1).mean(1))
    if gram is None or sums is None:  # nothing to share: the shapes still come from one row
        dim = np.asarray(last_inputs(features[:1, 0]), dtype=np.float64).shape[1] if len(features) else 0
        gram, sums = np.zeros((dim, dim)), np.zeros((num_classes, dim))
    return RidgeStats(
        gram=RidgeStats.pack(gram).astype(np.float32),
        sums=sums.astype(np.float32),
        counts=counts.astype(np.float32),
    )


def add_stats(stats: list[RidgeStats]) -> RidgeStats:
    """The federation's statistics: the clients' sums, added in float64."""
    return RidgeStats(
        gram=np.sum([s.gram.astype(np.float64) for s in stats], axis=0),
        sums=np.sum([s.sums.astype(np.float64) for s in stats], axis=0),
        counts=np.sum([s.counts.astype(np.float64) for s in stats], axis=0),
    )


def solve_ridge(stats: RidgeStats, penalty: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight (classes, dim), bias (classes,)) minimising |Z w + b - Y|^2 + penalty |w|^2 over
    the one-hot labels Y: the normal equations of [Z, 1], with the bias unpenalised."""
    gram, sums, counts = stats.full_gram(), stats.sums.astype(np.float64), stats.counts.astype(np.float64)
    dim = gram.shape[0]
    system = np.zeros((dim + 1, dim + 1))
    system[:dim, :dim] = gram + penalty * np.eye(dim)
    system[:dim, dim] = system[dim, :dim] = sums.sum(0)
    system[dim, dim] = max(counts.sum(), 1.0)
    targets = np.vstack([sums.T, counts[None, :]])  # [Z, 1]^T Y
    solution = np.linalg.solve(system, targets)
    return solution[:dim].T, solution[dim]


def solve_lda(stats: RidgeStats, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of linear discriminant analysis with a shared covariance shrunk towards
    a multiple of the identity: ``(1 - shrinkage) S + shrinkage tr(S)/dim I``, S the pooled
    within-class covariance (divided by the examples, as scikit-learn's ``solver='lsqr'`` does).
    Scores are ``w_c.z + b_c`` = log N(z; m_c, S) + log prior_c up to a term shared by all
    classes. A class no client shared statistics of is modelled as the average image with half
    an example's prior: rarely predicted, yet close enough for fine-tuning to bring it in."""
    gram, sums, counts = stats.full_gram(), stats.sums.astype(np.float64), stats.counts.astype(np.float64)
    dim, total = gram.shape[0], max(counts.sum(), 1.0)
    present = counts > 0
    means = np.tile(sums.sum(0) / total, (len(counts), 1))
    means[present] = sums[present] / counts[present, None]
    within = gram - means[present].T @ sums[present]  # sum over classes of (z - m_c)(z - m_c)^T
    covariance = within / total
    covariance = (1 - shrinkage) * covariance + shrinkage * np.trace(covariance) / dim * np.eye(dim)
    weight = np.linalg.solve(covariance, means.T).T
    bias = -0.5 * np.einsum("cd,cd->c", weight, means) + np.log(np.maximum(counts, 0.5) / total)
    return weight, bias


def ridge_scores(
    last_inputs: Callable[[np.ndarray], np.ndarray], features: np.ndarray, weight: np.ndarray, bias: np.ndarray
) -> np.ndarray:
    """The ridge classifier's (n, views, classes) scores of (n, views, ...) features, in batches."""
    rows = []
    step = max(1, ROWS_PER_BATCH // max(features.shape[1], 1))
    for start in range(0, len(features), step):
        batch = features[start : start + step]
        z = np.asarray(last_inputs(batch.reshape(-1, *batch.shape[2:])), dtype=np.float64)
        rows.append((z @ weight.T + bias).reshape(len(batch), batch.shape[1], -1))
    return np.concatenate(rows) if rows else np.zeros((0, features.shape[1], len(bias)))


def ridge_head_arrays(
    arrays: dict[str, np.ndarray],
    last_layer: str,
    weight: np.ndarray,
    bias: np.ndarray,
    temperature: float = 1.0,
    offsets: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """``arrays`` with the last layer set to the ridge classifier, its scores scaled by
    ``temperature`` into logits and ``offsets`` (post-hoc logit adjustment) subtracted."""
    updated = {name: np.array(value, dtype=np.float32, copy=True) for name, value in arrays.items()}
    updated[f"{last_layer}.weight"] = (temperature * weight).astype(np.float32)
    shifted = temperature * bias - (0 if offsets is None else offsets)
    updated[f"{last_layer}.bias"] = np.asarray(shifted, dtype=np.float32)
    return updated


# Temperatures tried when calibrating: the ridge's scores approximate one-hot targets (spread
# about 1), so softmax needs logits some tens of times larger to be confident.
TEMPERATURES = tuple(float(t) for t in np.geomspace(1, 300, 25))


def calibrated_temperature(nll_of: Callable[[float], float]) -> float:
    """The temperature of ``TEMPERATURES`` with the lowest negative log-likelihood ``nll_of``
    (on the server's held-out split). Scaling all logits alike changes no prediction, only how
    sure the head is, so fine-tuning from it starts from calibrated probabilities instead of
    near-uniform ones (whose large gradients would undo the solution in round 1)."""
    return min(TEMPERATURES, key=nll_of)
