"""The NumPy head against the torch head: the same seeds give the same head, within a stated
tolerance, for every way a head trains (linear, MLP with dropout, weight decay, FedProx, the
personal classifier-only fine-tune), and the same scores and FedNCM sums."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from common.fed3r import ridge_sums
from common.heads import TorchHead, class_sums, evaluate_head, head_arrays, make_head, train_head
from common.numpy_head import NumpyHead, head_shapes, initial_arrays
from common.trainable import MissingExtra, make_trainable, require_torch, trainable_shapes

# float32 on both sides; only the order of additions in BLAS differs. Over 5 epochs of SGD with
# momentum the arrays stay within 1e-6 of each other in these cases (measured: at most 2.4e-7;
# 6e-6 on 300 examples of 64-d features with mu=0.1); we allow 1e-4.
ATOL = 1e-4


def _embeddings(n: int = 120, views: int = 4, dim: int = 48, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative (n, views, dim) float16 features, as the cache holds, with a class signal."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n)
    centres = np.abs(rng.normal(1.0, 1.0, (classes, dim)))
    x = np.abs(centres[y][:, None] + rng.normal(0, 0.7, (n, views, dim)))
    return x.astype(np.float16), y


def _personal(name: str) -> bool:
    return name.startswith("classifier.")  # what client/edge_client.py's personalise trains


CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "weight-decay": {"weight_decay": 1e-3},
    "fedprox": {"proximal_mu": 0.5},
    "personal": {"train": _personal, "learning_rate": 0.005},
    "last-layer-only": {"train": lambda name: name.startswith(("classifier.3", "classifier.bias"))},
    # class balance (common/balance.py): loss weights, and logits adjusted by tau log prior
    "weighted": {"class_weights": np.array([0.5, 1.0, 2.5], dtype=np.float32)},
    "logit-adjusted": {"logit_offsets": np.log(np.array([0.6, 0.3, 0.1], dtype=np.float32))},
}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("case", list(CASES))
def test_same_seeds_give_the_same_head_as_torch(kind: str, case: str) -> None:
    # Prepare
    x, y = _embeddings()
    options = {"epochs": 5, "learning_rate": 0.05, "batch_size": 16, "seed": 7, **CASES[case]}
    torch_head = make_head(kind, 48, 3, hidden=32, seed=3)
    numpy_head = NumpyHead.initial(kind, 48, 3, hidden=32, seed=3)

    # Execute
    torch_result = train_head(torch_head, x, y, **options)
    numpy_result = numpy_head.train(x, y, **options)

    # Assert
    expected, actual = head_arrays(torch_head), numpy_head.arrays()
    assert list(actual) == list(expected)  # the names (and order) the wire carries
    start = initial_arrays(kind, 48, 3, 32, seed=3)
    assert any(not np.allclose(actual[name], start[name]) for name in start)  # it did train
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=ATOL, err_msg=name)
    assert numpy_result.loss == pytest.approx(torch_result.loss, rel=1e-4)
    assert numpy_result.accuracy == torch_result.accuracy
    assert numpy_result.num_examples == torch_result.num_examples == len(y)


@pytest.mark.parametrize("average_views", [False, True])
def test_same_scores_as_torch(average_views: bool) -> None:
    x, y = _embeddings()
    arrays = initial_arrays("mlp", 48, 3, 32, seed=1)
    torch_head, numpy_head = make_head("mlp", 48, 3, hidden=32, seed=1), NumpyHead("mlp", arrays)

    expected = evaluate_head(torch_head, x, y, 3, average_views)
    actual = numpy_head.evaluate(x, y, 3, average_views)

    assert actual.loss == pytest.approx(expected.loss, rel=1e-5)
    assert actual.confusion_matrix == expected.confusion_matrix


def test_same_class_sums_as_torch() -> None:
    x, y = _embeddings()
    torch_head, numpy_head = make_head("linear", 48, 3, seed=0), NumpyHead.initial("linear", 48, 3, seed=0)

    expected_sums, expected_counts = class_sums(torch_head, x, y, 3, min_examples=2)
    sums, counts = numpy_head.class_sums(x, y, 3, min_examples=2)

    np.testing.assert_allclose(sums, expected_sums, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(counts, expected_counts)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_same_ridge_sums_as_torch(kind: str) -> None:
    """Fed3R's statistics of what the last layer sees (the MLP's: its seeded ReLU features)."""
    x, y = _embeddings()
    torch_head = TorchHead(make_head(kind, 48, 3, hidden=16, seed=0))
    numpy_head = NumpyHead.initial(kind, 48, 3, hidden=16, seed=0)

    expected = ridge_sums(torch_head.last_inputs, x, y, 3, min_examples=2)
    actual = ridge_sums(numpy_head.last_inputs, x, y, 3, min_examples=2)

    for name, value in actual.to_arrays().items():
        np.testing.assert_allclose(value, expected.to_arrays()[name], rtol=1e-5, atol=1e-3)


def test_the_numpy_head_learns_and_its_dropout_is_seeded() -> None:
    x, y = _embeddings(n=200)
    heads = [NumpyHead.initial("mlp", 48, 3, hidden=32, seed=0) for _ in range(2)]
    before = heads[0].evaluate(x, y, 3).loss

    results = [head.train(x, y, epochs=10, learning_rate=0.05, batch_size=16, seed=4) for head in heads]

    assert heads[0].evaluate(x, y, 3).loss < before and results[0].accuracy > 0.8
    for name, value in heads[0].arrays().items():
        np.testing.assert_array_equal(value, heads[1].arrays()[name])


def test_arrays_names_shapes_and_load_errors() -> None:
    head = NumpyHead.initial("mlp", 16, 3, hidden=8)
    assert (
        head.shapes()
        == head_shapes("mlp", 16, 3, 8)
        == {
            "classifier.0.weight": (8, 16),
            "classifier.0.bias": (8,),
            "classifier.3.weight": (3, 8),
            "classifier.3.bias": (3,),
        }
    )
    assert all(a.dtype == np.float32 for a in head.arrays().values())
    wrong = {**head.arrays(), "classifier.3.bias": np.zeros(4, np.float32)}
    with pytest.raises(ValueError, match=r"'classifier.3.bias' has shape \(4,\)"):
        head.load(wrong)
    with pytest.raises(ValueError, match="unexpected"):
        head.load({**head.arrays(), "extra": np.zeros(1)})
    with pytest.raises(ValueError, match="linear"):
        NumpyHead.initial("transformer", 4, 2)


def test_a_head_only_run_is_the_numpy_head_and_a_later_cut_needs_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    head = make_trainable("efficientnet_lite0", 0, "linear", 4, seed=42)
    assert isinstance(head, NumpyHead)
    assert trainable_shapes("efficientnet_lite0", 0, "linear", 4) == head.shapes()
    np.testing.assert_array_equal(
        head.arrays()["classifier.weight"], head_arrays(make_head("linear", 1280, 4, seed=42))["classifier.weight"]
    )
    missing: Callable[[str], None] = lambda name: None  # noqa: E731  (find_spec: "not installed")
    monkeypatch.setattr("common.trainable.importlib.util.find_spec", missing)
    with pytest.raises(MissingExtra, match=r"edgesplit\[edge,torch\]"):
        require_torch("cut=1")
    with pytest.raises(MissingExtra, match="cut=1"):
        make_trainable("efficientnet_lite0", 1, "linear", 4)
