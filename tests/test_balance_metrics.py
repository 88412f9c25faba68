"""Class balance (common/balance.py) in both heads against its formulas, and the metrics that
show what accuracy hides: balanced accuracy, per-class recall, recall at a chosen precision."""

from __future__ import annotations

import numpy as np
import pytest

from common.balance import ABSENT_CLASS_OFFSET, balance_terms, class_prior, posthoc_offsets, training_offsets
from common.heads import make_head, train_head
from common.metrics import classification_report, precision_recall_curve, recall_at_precision
from common.numpy_head import NumpyHead

PRIOR = np.array([0.7, 0.2, 0.1])


def test_balanced_weights_make_every_class_weigh_the_same() -> None:
    weights, offsets = balance_terms("weighted", tuple(PRIOR))
    assert offsets is None
    np.testing.assert_allclose(weights, [1 / 2.1, 1 / 0.6, 1 / 0.3], rtol=1e-6)
    np.testing.assert_allclose(PRIOR * weights, 1 / 3, rtol=1e-6)  # each class's total weight
    assert float(PRIOR @ weights) == pytest.approx(1.0)  # the mean weight over the data


def test_logit_adjustment_adds_tau_log_prior_and_nothing_without_a_prior() -> None:
    weights, offsets = balance_terms("logit-adjusted", tuple(PRIOR), tau=0.5)
    assert weights is None
    np.testing.assert_allclose(offsets, 0.5 * np.log(PRIOR), rtol=1e-6)
    assert balance_terms("logit-adjusted", ()) == (None, None)
    assert balance_terms("none", tuple(PRIOR)) == (None, None)
    np.testing.assert_allclose(posthoc_offsets("weighted", PRIOR), np.log(PRIOR), rtol=1e-6)
    np.testing.assert_allclose(class_prior(np.array([7, 2, 1])), PRIOR)
    # a class no client reported is not adjusted: its log prior would be an unbounded boost
    np.testing.assert_allclose(
        posthoc_offsets("logit-adjusted", np.array([0.8, 0.2, 0.0])), [np.log(0.8), np.log(0.2), 0]
    )


def test_the_local_prior_correction_is_log_local_over_global_and_drops_absent_classes() -> None:
    local = np.array([0, 6, 2])  # this client lacks class 0
    weights, offsets = training_offsets("none", tuple(PRIOR), 1.0, local)
    assert weights is None and offsets is not None
    np.testing.assert_allclose(offsets[1:], np.log([0.75, 0.25]) - np.log(PRIOR[1:]), rtol=1e-6)
    assert offsets[0] == ABSENT_CLASS_OFFSET - np.float32(np.log(0.7))
    # logit adjustment at tau 1 plus the correction: the client trains on logits + log(its own prior)
    _, both = training_offsets("logit-adjusted", tuple(PRIOR), 1.0, local)
    np.testing.assert_allclose(both[1:], np.log([0.75, 0.25]), rtol=1e-5)
    # weights are kept; without counts or without the federation's prior nothing is added
    assert training_offsets("weighted", tuple(PRIOR), 1.0, local)[0] is not None
    assert training_offsets("none", tuple(PRIOR), 1.0, None) == (None, None)
    assert training_offsets("none", (), 1.0, local) == (None, None)


def test_the_local_prior_correction_keeps_label_skew_from_pulling_the_head() -> None:
    """Four Gaussian classes (a linear softmax head is the right model), eight clients with
    Dirichlet(0.1) label skew. From the pooled optimum, plain local training pulls each client's
    bias toward its own classes; with the correction each client fits the same class-conditional
    scores, so the optimum barely moves."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1.0, (4, 16))
    prior = np.array([0.55, 0.25, 0.12, 0.08])
    clients = []
    for _ in range(8):
        shares = rng.dirichlet([0.1] * 4) * prior
        labels = rng.choice(4, 100, p=shares / shares.sum())
        clients.append(((centres[labels] + rng.normal(0, 1.2, (100, 16)))[:, None, :], labels))
    pooled_y = np.concatenate([y for _, y in clients])
    pooled = NumpyHead.initial("linear", 16, 4, seed=0)
    pooled_x = np.concatenate([x for x, _ in clients])
    pooled.train(pooled_x, pooled_y, epochs=60, learning_rate=0.05, batch_size=16, seed=0)
    optimum, federation_prior = pooled.arrays(), tuple(class_prior(np.bincount(pooled_y, minlength=4)))

    def bias_drift(correct: bool) -> float:
        moved = []
        for x, y in clients:
            local = NumpyHead("linear", optimum)
            counts = np.bincount(y, minlength=4) if correct else None
            _, offsets = training_offsets("none", federation_prior, 1.0, counts)
            local.train(x, y, epochs=5, learning_rate=0.05, batch_size=16, seed=1, logit_offsets=offsets)
            moved.append(np.linalg.norm(local.arrays()["classifier.bias"] - optimum["classifier.bias"]))
        return float(np.mean(moved))

    plain, corrected = bias_drift(False), bias_drift(True)
    assert corrected < 0.3 * plain, (plain, corrected)


@pytest.mark.parametrize("method", ["weighted", "logit-adjusted"])
def test_both_heads_report_the_balanced_loss_of_its_formula(method: str) -> None:
    """With a zero step the reported loss is the objective at the start: sum_i w[y_i] * -log
    softmax(logits_i + offsets)[y_i] / n, computed here by hand in float64."""
    # Prepare: one view, so no view is drawn
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(1, 1, (50, 1, 8))).astype(np.float16)
    y = rng.integers(0, 3, 50)
    weights, offsets = balance_terms(method, tuple(PRIOR), tau=1.5)
    numpy_head = NumpyHead.initial("linear", 8, 3, seed=1)
    logits = numpy_head.logits(numpy_head.pooled(x[:, 0]))[0].astype(np.float64)
    logits = logits + (0 if offsets is None else offsets)
    log_probabilities = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    example_weights = np.ones(50) if weights is None else weights[y]
    expected = float(-(example_weights * log_probabilities[np.arange(50), y]).mean())
    options = {"epochs": 1, "learning_rate": 0.0, "batch_size": 16, "class_weights": weights, "logit_offsets": offsets}

    # Execute
    numpy_loss = numpy_head.train(x, y, **options).loss
    torch_loss = train_head(make_head("linear", 8, 3, seed=1), x, y, **options).loss

    # Assert
    assert numpy_loss == pytest.approx(expected, rel=1e-5)
    assert torch_loss == pytest.approx(expected, rel=1e-5)


def test_balanced_accuracy_and_per_class_recall_by_hand() -> None:
    # 6 of class 0 (5 right), 3 of class 1 (1 right), 1 of class 2 (0 right), class 3 absent
    y_true = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])
    y_pred = np.array([0, 0, 0, 0, 0, 1, 1, 0, 0, 0])
    report = classification_report(y_true, y_pred, 4)
    assert report.accuracy == pytest.approx(0.6)
    assert report.per_class_recall == pytest.approx([5 / 6, 1 / 3, 0.0, 0.0])
    assert report.balanced_accuracy == pytest.approx((5 / 6 + 1 / 3 + 0) / 3)  # over the 3 classes present


def test_recall_at_precision_by_hand() -> None:
    # scores high to low: + + - + - + - -   (4 positives)
    positive = np.array([1, 1, 0, 1, 0, 1, 0, 0], dtype=bool)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    precision, recall, thresholds = precision_recall_curve(positive, scores)
    np.testing.assert_allclose(thresholds, scores)  # no ties: one point per score
    np.testing.assert_allclose(precision[:4], [1, 1, 2 / 3, 3 / 4])
    np.testing.assert_allclose(recall[:4], [0.25, 0.5, 0.5, 0.75])
    point = recall_at_precision(positive, scores, 0.75)  # 3 of the top 4: recall 3/4 at threshold 0.6
    assert (point.recall, point.precision, point.threshold, point.positives) == (0.75, 0.75, 0.6, 4)
    assert recall_at_precision(positive, scores, 1.0).recall == 0.5
    unreachable = recall_at_precision(np.zeros(3, dtype=bool), scores[:3], 0.9)
    assert unreachable.recall == 0.0 and np.isnan(unreachable.threshold)


def test_tied_scores_enter_the_curve_together() -> None:
    precision, recall, thresholds = precision_recall_curve(np.array([1, 0, 1]), np.array([0.5, 0.5, 0.1]))
    np.testing.assert_allclose(thresholds, [0.5, 0.1])
    np.testing.assert_allclose(precision, [0.5, 2 / 3])
    np.testing.assert_allclose(recall, [0.5, 1.0])
