"""Fed3R's closed-form head (common/fed3r.py): the federation's ridge classifier equals the
centralised one whatever the partition and client order; classes below the floor are left out;
the server's screen refuses statistics no honest client can produce."""

from __future__ import annotations

import numpy as np
import pytest

from common.fed3r import add_stats, ridge_head_arrays, ridge_sums, solve_lda, solve_ridge
from common.numpy_head import NumpyHead
from common.protocol import RidgeStats
from server.validation import ridge_stats_reject_reason

# The clients send float32 sums (the server adds them in float64); on these sizes the federated
# solution is within 2e-6 of the centralised float64 one (measured); we allow 1e-4.
ATOL = 1e-4
CLASSES, DIM, VIEWS, PENALTY = 3, 12, 2, 0.5


def _data(n: int = 240) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    y = rng.integers(0, CLASSES, n)
    centres = np.abs(rng.normal(1.0, 1.0, (CLASSES, DIM)))
    return np.abs(centres[y][:, None] + rng.normal(0, 0.7, (n, VIEWS, DIM))).astype(np.float16), y


def _centralised(head: NumpyHead, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge by least squares on the stacked rows, each view weighted 1/views, bias unpenalised."""
    z = head.last_inputs(x.reshape(-1, x.shape[-1]).astype(np.float32)).astype(np.float64)
    design = np.hstack([z, np.ones((len(z), 1))]) / np.sqrt(VIEWS)
    targets = np.eye(CLASSES)[np.repeat(y, VIEWS)] / np.sqrt(VIEWS)
    penalty_rows = np.hstack([np.sqrt(PENALTY) * np.eye(z.shape[1]), np.zeros((z.shape[1], 1))])
    solution, *_ = np.linalg.lstsq(
        np.vstack([design, penalty_rows]), np.vstack([targets, np.zeros((z.shape[1], CLASSES))]), rcond=None
    )
    return solution[:-1].T, solution[-1]


def _partitions(y: np.ndarray) -> dict[str, list[np.ndarray]]:
    order = np.random.default_rng(2).permutation(len(y))
    return {
        "iid-4": list(np.array_split(order, 4)),
        "one-class-each": [np.flatnonzero(y == c) for c in range(CLASSES)],
        "skewed-sizes": list(np.split(np.argsort(y, kind="stable"), [5, 30, 200])),
        "one-client": [np.arange(len(y))],
    }


@pytest.mark.parametrize("kind", ["linear", "mlp"])  # mlp: the ridge on seeded random ReLU features (Fed3R-RF)
@pytest.mark.parametrize("split", ["iid-4", "one-class-each", "skewed-sizes", "one-client"])
def test_federated_ridge_equals_the_centralised_one_in_any_client_order(kind: str, split: str) -> None:
    # Prepare
    x, y = _data()
    head = NumpyHead.initial(kind, DIM, CLASSES, hidden=20, seed=4)
    expected_weight, expected_bias = _centralised(head, x, y)
    shares = _partitions(y)[split]

    # Execute
    stats = [ridge_sums(head.last_inputs, x[share], y[share], CLASSES) for share in shares]
    solutions = [solve_ridge(add_stats(ordered), PENALTY) for ordered in (stats, stats[::-1])]

    # Assert
    for weight, bias in solutions:
        np.testing.assert_allclose(weight, expected_weight, atol=ATOL)
        np.testing.assert_allclose(bias, expected_bias, atol=ATOL)
    dim = DIM if kind == "linear" else 20
    assert stats[0].gram.dtype == np.float32 and stats[0].gram.shape == (dim * (dim + 1) // 2,)


@pytest.mark.parametrize("split", ["iid-4", "one-class-each", "skewed-sizes"])
@pytest.mark.parametrize("shrinkage", [0.05, 0.5])
def test_federated_lda_equals_scikit_learns_on_the_pooled_data(split: str, shrinkage: float) -> None:
    """One view (scikit-learn's LDA weighs every row alike): the same weights, intercepts and so
    the same predictions, from the clients' sums in either order."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    # Prepare
    x, y = _data()
    x = x[:, :1]
    head = NumpyHead.initial("linear", DIM, CLASSES, seed=4)
    z = head.last_inputs(x[:, 0].astype(np.float32)).astype(np.float64)
    expected = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage).fit(z, y)
    stats = [ridge_sums(head.last_inputs, x[share], y[share], CLASSES) for share in _partitions(y)[split]]

    # Execute
    solutions = [solve_lda(add_stats(ordered), shrinkage) for ordered in (stats, stats[::-1])]

    # Assert
    for weight, bias in solutions:
        np.testing.assert_allclose(weight, expected.coef_, rtol=1e-4, atol=ATOL)
        np.testing.assert_allclose(bias, expected.intercept_, rtol=1e-4, atol=ATOL)


def test_lda_scores_a_class_without_statistics_as_the_average_image_with_a_tiny_prior() -> None:
    # Prepare: nobody shared class 2
    x, y = _data()
    keep = y != 2
    head = NumpyHead.initial("linear", DIM, CLASSES, seed=0)
    stats = ridge_sums(head.last_inputs, x[keep], y[keep], CLASSES)

    # Execute
    weight, bias = solve_lda(stats, 0.1)

    # Assert: finite, and never the most likely class for an image of a shared class
    assert np.isfinite(weight).all() and np.isfinite(bias).all()
    z = head.last_inputs(x[keep][:, 0].astype(np.float32))
    scores = z @ weight.T + bias
    assert (scores.argmax(1) != 2).mean() > 0.9
    assert (scores.argmax(1) == y[keep]).mean() > 0.8


def test_classes_below_the_floor_are_left_out_of_every_sum() -> None:
    # Prepare: class 2 has two examples on this client
    x, y = _data(60)
    y = np.where(y == 2, 0, y)
    y[:2] = 2
    head = NumpyHead.initial("linear", DIM, CLASSES, seed=0)

    # Execute
    floored = ridge_sums(head.last_inputs, x, y, CLASSES, min_examples=3)
    without = ridge_sums(head.last_inputs, x[2:], y[2:], CLASSES)

    # Assert
    assert floored.counts.tolist() == [float((y == 0).sum()), float((y == 1).sum()), 0.0]
    assert not floored.sums[2].any()
    np.testing.assert_array_equal(floored.gram, without.gram)


def test_the_ridge_head_is_the_solution_scaled_and_adjusted() -> None:
    # Prepare
    head = NumpyHead.initial("linear", DIM, CLASSES, seed=0).arrays()
    weight, bias = np.ones((CLASSES, DIM)), np.array([0.1, 0.2, 0.3])

    # Execute
    arrays = ridge_head_arrays(head, "classifier", weight, bias, temperature=10, offsets=np.array([1.0, 0, 0]))

    # Assert
    np.testing.assert_allclose(arrays["classifier.weight"], 10 * weight)
    np.testing.assert_allclose(arrays["classifier.bias"], [0.0, 2.0, 3.0], atol=1e-6)


def _honest() -> dict[str, np.ndarray]:
    x, y = _data(30)
    return ridge_sums(NumpyHead.initial("linear", DIM, CLASSES, seed=0).last_inputs, x, y, CLASSES).to_arrays()


def test_honest_statistics_pass_the_screen() -> None:
    assert ridge_stats_reject_reason(_honest(), RidgeStats.shapes(CLASSES, DIM)) is None


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (lambda a: a.update(gram=np.full_like(a["gram"], np.nan)), "'gram' contains NaN or Inf"),
        (lambda a: a.update(sums=a["sums"][:, :-1]), "'sums' has shape"),
        (lambda a: a.update(counts=-a["counts"]), "non-negative integers"),
        (lambda a: a.update(counts=np.zeros_like(a["counts"])), "no examples"),
        (lambda a: a["gram"].__setitem__(1, 1e6), "Cauchy-Schwarz"),
        (lambda a: a["gram"].__setitem__(0, -1e3), "negative diagonal"),
        (lambda a: a["sums"].__imul__(100), "class sum is longer"),
    ],
)
def test_statistics_no_honest_client_can_produce_are_refused(forge, reason: str) -> None:
    arrays = _honest()
    forge(arrays)
    assert reason in str(ridge_stats_reject_reason(arrays, RidgeStats.shapes(CLASSES, DIM)))
