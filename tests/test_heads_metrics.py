"""Metrics against hand-computed numbers; the head: seeding, arrays, training, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics
import torch

from common.heads import (
    PowerNorm,
    class_sums,
    evaluate_head,
    head_arrays,
    load_head_arrays,
    make_head,
    train_head,
)
from common.metrics import classification_report
from common.numpy_head import ncm_head_arrays

# --- metrics --------------------------------------------------------------------------------------

Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 1])
# Confusion matrix (rows true, columns predicted):
#   [[2, 1, 1],
#    [1, 2, 0],
#    [0, 1, 2]]
# true positives 2, 2, 2; predicted per class 3, 4, 3; actual per class 4, 3, 3
# precision 2/3, 1/2, 2/3; recall 1/2, 2/3, 2/3; F1 4/7, 4/7, 2/3


def test_classification_report_by_hand():
    # Execute
    report = classification_report(Y_TRUE, Y_PRED, num_classes=3, loss=0.25)

    # Assert
    assert report.confusion_matrix == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    assert report.accuracy == pytest.approx(6 / 10)
    assert report.per_class_recall == pytest.approx([1 / 2, 2 / 3, 2 / 3])
    assert report.macro_precision == pytest.approx(11 / 18)
    assert report.macro_recall == pytest.approx(11 / 18)
    assert report.macro_f1 == pytest.approx(38 / 63)
    assert report.num_examples == 10
    assert report.loss == 0.25


def test_classification_report_matches_sklearn():
    report = classification_report(Y_TRUE, Y_PRED, num_classes=3)

    precision, recall, f1, _ = sklearn.metrics.precision_recall_fscore_support(
        Y_TRUE, Y_PRED, labels=[0, 1, 2], average="macro", zero_division=0
    )
    assert report.accuracy == pytest.approx(sklearn.metrics.accuracy_score(Y_TRUE, Y_PRED))
    assert report.macro_precision == pytest.approx(precision)
    assert report.macro_recall == pytest.approx(recall)
    assert report.macro_f1 == pytest.approx(f1)
    assert report.confusion_matrix == sklearn.metrics.confusion_matrix(Y_TRUE, Y_PRED, labels=[0, 1, 2]).tolist()


def test_absent_class_counts_as_zero_in_macro_means():
    # Prepare: class 3 never occurs and is never predicted; class 2 is predicted but never true
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 2, 1, 1])

    # Execute
    report = classification_report(y_true, y_pred, num_classes=4)

    # Assert: precision 1, 1, 0, 0; recall 1/2, 1, 0, 0; F1 2/3, 1, 0, 0
    assert report.macro_precision == pytest.approx(2 / 4)
    assert report.macro_recall == pytest.approx(1.5 / 4)
    assert report.macro_f1 == pytest.approx((2 / 3 + 1) / 4)
    assert report.per_class_recall == [0.5, 1.0, 0.0, 0.0]
    precision, recall, f1, _ = sklearn.metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=[0, 1, 2, 3], average="macro", zero_division=0
    )
    assert (report.macro_precision, report.macro_recall, report.macro_f1) == pytest.approx((precision, recall, f1))


def test_empty_report_is_zero_not_nan():
    report = classification_report(np.zeros(0), np.zeros(0), num_classes=2)

    assert report.accuracy == 0.0
    assert report.num_examples == 0
    assert report.confusion_matrix == [[0, 0], [0, 0]]


# --- head construction and arrays -----------------------------------------------------------------


def test_make_head_same_seed_same_weights_other_seed_differs():
    # Execute
    first = head_arrays(make_head("linear", 16, 3, seed=5).classifier)
    again = head_arrays(make_head("linear", 16, 3, seed=5).classifier)
    other = head_arrays(make_head("linear", 16, 3, seed=6).classifier)

    # Assert
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["weight"], other["weight"])


def test_make_head_ignores_the_global_torch_seed():
    torch.manual_seed(1)
    first = head_arrays(make_head("mlp", 8, 2, hidden=4, seed=0).classifier)
    torch.manual_seed(2)
    second = head_arrays(make_head("mlp", 8, 2, hidden=4, seed=0).classifier)

    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_linear_head_arrays_names_shapes_dtype():
    # Execute
    arrays = head_arrays(make_head("linear", 16, 3).classifier)

    # Assert
    assert set(arrays) == {"weight", "bias"}
    assert arrays["weight"].shape == (3, 16)
    assert arrays["bias"].shape == (3,)
    assert all(a.dtype == np.float32 for a in arrays.values())
    bound = 1 / 16**0.5
    assert all(np.abs(a).max() <= bound for a in arrays.values())


def test_mlp_head_arrays():
    arrays = head_arrays(make_head("mlp", 16, 3, hidden=8).classifier)

    assert {k: v.shape for k, v in arrays.items()} == {
        "0.weight": (8, 16),
        "0.bias": (8,),
        "3.weight": (3, 8),
        "3.bias": (3,),
    }


def test_unknown_head_kind():
    with pytest.raises(ValueError) as caught:
        make_head("transformer", 4, 2)

    assert "linear" in str(caught.value)


def test_load_head_arrays_round_trip():
    # Prepare
    source = head_arrays(make_head("linear", 16, 3, seed=1).classifier)
    target = make_head("linear", 16, 3, seed=2)

    # Execute
    load_head_arrays(target.classifier, source)

    # Assert
    loaded = head_arrays(target.classifier)
    for name in source:
        np.testing.assert_array_equal(loaded[name], source[name])


def test_load_head_arrays_wrong_shape_is_a_value_error():
    # Prepare
    head = make_head("linear", 16, 3)
    arrays = head_arrays(head.classifier)
    arrays["weight"] = np.zeros((3, 15), dtype=np.float32)

    # Execute
    with pytest.raises(ValueError) as caught:
        load_head_arrays(head.classifier, arrays)

    # Assert
    assert "'weight'" in str(caught.value)
    assert "(3, 15)" in str(caught.value)


def test_load_head_arrays_wrong_names_is_a_value_error():
    head = make_head("linear", 16, 3)
    arrays = head_arrays(head.classifier)
    arrays["extra"] = np.zeros(1, dtype=np.float32)

    with pytest.raises(ValueError) as caught:
        load_head_arrays(head.classifier, arrays)

    assert "extra" in str(caught.value)


# --- training -------------------------------------------------------------------------------------


def _blobs(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two non-negative Gaussian blobs in 8 dimensions, far apart: (n, 1 view, 8) features."""
    rng = np.random.default_rng(seed)
    centre0 = np.array([3.0, 3.0, 3.0, 3.0, 0.5, 0.5, 0.5, 0.5])
    centre1 = centre0[::-1].copy()
    x = np.concatenate([centre0 + rng.normal(0, 0.5, (n_per_class, 8)), centre1 + rng.normal(0, 0.5, (n_per_class, 8))])
    y = np.repeat([0, 1], n_per_class)
    return np.abs(x).astype(np.float32)[:, None], y


def test_train_head_learns_separable_blobs():
    # Prepare
    train_x, train_y = _blobs(100, seed=0)
    test_x, test_y = _blobs(50, seed=1)
    head = make_head("linear", 8, 2, seed=0)
    before = evaluate_head(head, test_x, test_y, num_classes=2)

    # Execute
    result = train_head(head, train_x, train_y, epochs=10, learning_rate=0.05, batch_size=16, seed=0)
    after = evaluate_head(head, test_x, test_y, num_classes=2)

    # Assert
    assert result.num_examples == 200
    assert after.loss < before.loss
    assert after.accuracy > 0.9
    assert result.accuracy > 0.9
    assert after.num_examples == 100
    assert not head.training


def test_train_head_is_seeded_for_the_linear_head():
    x, y = _blobs(30, seed=0)
    heads = [make_head("linear", 8, 2, seed=0) for _ in range(2)]

    for head in heads:
        train_head(head, x, y, epochs=2, learning_rate=0.05, batch_size=8, seed=3)

    first, second = (head_arrays(h.classifier) for h in heads)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_train_head_is_seeded_for_the_mlp_head():
    """The mlp head has dropout. Its masks come from ``seed`` (common/numpy_head.py's ``Draws``),
    not from torch's global RNG, so the global RNG's history changes nothing (the client passes a
    per-round, per-node seed expecting reproducible local training)."""
    # Prepare
    x, y = _blobs(30, seed=0)
    heads = [make_head("mlp", 8, 2, hidden=4, seed=0) for _ in range(2)]

    # Execute: same seed argument, different global RNG history
    torch.manual_seed(100)
    train_head(heads[0], x, y, epochs=2, learning_rate=0.05, batch_size=8, seed=3)
    torch.manual_seed(200)
    train_head(heads[1], x, y, epochs=2, learning_rate=0.05, batch_size=8, seed=3)

    # Assert
    first, second = (head_arrays(h.classifier) for h in heads)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_proximal_term_keeps_weights_near_the_start():
    # Prepare
    x, y = _blobs(50, seed=0)
    start = head_arrays(make_head("linear", 8, 2, seed=0).classifier)

    def drift(mu: float) -> float:
        head = make_head("linear", 8, 2, seed=0)
        train_head(head, x, y, epochs=5, learning_rate=0.05, batch_size=10, proximal_mu=mu, seed=0)
        arrays = head_arrays(head.classifier)
        return float(sum(np.sum((arrays[k] - start[k]) ** 2) for k in start))

    # Execute / Assert
    assert drift(10.0) < 0.5 * drift(0.0)


def test_evaluate_head_on_no_examples():
    report = evaluate_head(make_head("linear", 8, 2), np.zeros((0, 1, 8), np.float32), np.zeros(0), 2)

    assert report.num_examples == 0
    assert np.isnan(report.loss)


def test_power_norm_rows_have_unit_mean_square():
    # Prepare
    x = torch.tensor([[4.0, 0.0, 9.0, 1.0], [100.0, 1.0, 0.01, 0.0], [-4.0, 4.0, 0.0, 0.0]])

    # Execute
    y = PowerNorm()(x)

    # Assert
    assert torch.allclose((y**2).mean(dim=1), torch.ones(3))
    # first row: sqrt -> [2, 0, 3, 1], norm sqrt(14), times sqrt(4) = 2
    assert torch.allclose(y[0], torch.tensor([2.0, 0.0, 3.0, 1.0]) * 2 / 14**0.5)
    assert y[2, 0] < 0 < y[2, 1]  # the sign is kept


def test_class_sums_leave_out_classes_with_too_few_examples():
    head = make_head("linear", 8, 3, seed=0)
    x, _ = _blobs(5, seed=0)  # ten (1 view, 8) examples
    y = np.array([0] * 6 + [1] * 3 + [2] * 1)

    sums, counts = class_sums(head, x, y, num_classes=3, min_examples=3)

    assert counts.tolist() == [6.0, 3.0, 0.0]  # class 2's single image is not shared
    assert not sums[2].any()
    normed = head.pooled(torch.from_numpy(x[:, 0])).detach().numpy()
    np.testing.assert_allclose(sums[0], normed[:6].sum(0), rtol=1e-5)


def test_ncm_head_points_each_known_class_at_its_mean():
    start = head_arrays(make_head("linear", 4, 3, seed=0))
    sums = np.array([[2.0, 0, 0, 0], [0, 0, 3.0, 4.0], [0, 0, 0, 0]], np.float32)
    counts = np.array([2.0, 5.0, 0.0], np.float32)

    arrays, known = ncm_head_arrays(start, sums, counts)

    assert known == [0, 1]
    np.testing.assert_allclose(arrays["classifier.weight"][0], [1, 0, 0, 0])
    np.testing.assert_allclose(arrays["classifier.weight"][1], [0, 0, 0.6, 0.8])
    np.testing.assert_array_equal(arrays["classifier.weight"][2], start["classifier.weight"][2])  # no data: as it was
    assert arrays["classifier.bias"][:2].tolist() == [0.0, 0.0]
