"""The head on NumPy: what a head-only (``cut`` 0) board trains, scores and sums, without torch.

Why NumPy and not a small library: the head is one or two matrix products, a softmax and SGD with
momentum, a page of code that NumPy (which Flower and ONNX Runtime install anyway) runs in about
a millisecond per batch. A framework (tinygrad, JAX, ONNX Runtime training) would add tens to
hundreds of MB to a board, a wheel to find for each ARM flavour, and its own random streams, so
the same seeds could no longer give the same head as the torch code.

The torch head (common/heads.py) computes the same function from the same arrays, and both draw
every random choice (initial weights, batch order, the view of each example, dropout masks) from
``Draws``, so the same seeds give the same head on both (tests/test_numpy_head.py states how
close). Array names are torch's (``classifier.weight``, or ``classifier.0.*`` and
``classifier.3.*`` for the MLP), so the server, the export and the wire cannot tell them apart.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.kinds import HeadKind, kind_values
from common.metrics import ClassificationReport, classification_report

HEAD_KINDS = tuple(kind_values(HeadKind))
DROPOUT = 0.2  # the MLP's dropout between its two layers
MOMENTUM = 0.9  # SGD momentum of local training
EPS = 1e-12  # as torch.nn.functional.normalize


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean cross-entropy over the examples of the last epoch
    accuracy: float  # on the local training examples, during the last epoch
    num_examples: int
    seconds: float


def layer_names(kind: HeadKind) -> tuple[str, ...]:
    """The classifier's linear layers, as torch names them."""
    if kind == HeadKind.LINEAR:
        return ("classifier",)
    if kind == HeadKind.MLP:
        return ("classifier.0", "classifier.3")  # Linear, ReLU, Dropout, Linear
    raise ValueError(f"Unknown head {kind!r}; use one of {HEAD_KINDS}.")


def head_shapes(kind: HeadKind, in_dim: int, num_classes: int, hidden: int = 256) -> dict[str, tuple[int, ...]]:
    """Name and shape of every array of a head, in torch's parameter order."""
    widths = (in_dim, num_classes) if kind == HeadKind.LINEAR else (in_dim, hidden, num_classes)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, fan_in, fan_out in zip(layer_names(kind), widths, widths[1:], strict=False):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (fan_out, fan_in), (fan_out,)
    return shapes


def initial_arrays(
    kind: HeadKind, in_dim: int, num_classes: int, hidden: int = 256, seed: int = 0
) -> dict[str, np.ndarray]:
    """PyTorch's default init of each linear layer, U(-1/sqrt(fan in), 1/sqrt(fan in)), drawn
    from a NumPy generator: every party that builds the head from ``seed`` gets the same weights."""
    generator = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for name, shape in head_shapes(kind, in_dim, num_classes, hidden).items():
        fan_in = shape[1] if name.endswith(".weight") else arrays[name.replace(".bias", ".weight")].shape[1]
        bound = 1 / fan_in**0.5
        arrays[name] = generator.uniform(-bound, bound, shape).astype(np.float32)
    return arrays


class Draws:
    """Every random choice of one training call, from one NumPy generator in one order: per
    epoch the batch order, then a view per example; per batch of an MLP, its dropout mask."""

    def __init__(self, seed: int) -> None:
        self.generator = np.random.default_rng(seed)

    def epoch(self, num_examples: int, num_views: int) -> tuple[np.ndarray, np.ndarray]:
        return self.generator.permutation(num_examples), self.generator.integers(0, num_views, num_examples)

    def keep_mask(self, shape: tuple[int, ...]) -> np.ndarray:
        """Inverted dropout: 0 with chance ``DROPOUT``, else 1 / (1 - ``DROPOUT``)."""
        keep = self.generator.random(shape) >= DROPOUT
        return keep.astype(np.float32) / np.float32(1 - DROPOUT)


def batches(
    features: np.ndarray, labels: np.ndarray, epoch: tuple[np.ndarray, np.ndarray], batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch's (float32 features, labels) batches: each example once, in its drawn view. Only
    one batch at a time is copied out of ``features`` (float16, as cached), never the whole array."""
    order, views = epoch
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield features[index, views[index]].astype(np.float32), labels[index]


def one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """One BLAS thread for training: a head's products are small, and a second thread costs more
    in hand-offs than it saves (an MLP head's 5 epochs: 0.9 s against 6 s with two threads, when
    other processes share the 2 cores; the torch head runs on one thread for the same reason)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a base dependency; without it, the BLAS default
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def power_norm(x: np.ndarray) -> np.ndarray:
    """common/heads.py's PowerNorm: signed square root, then unit mean square per row."""
    x = np.sign(x) * np.sqrt(np.abs(x))
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x / np.maximum(norm, np.float32(EPS)) * np.float32(x.shape[1] ** 0.5)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def ncm_head_arrays(
    arrays: Mapping[str, np.ndarray], sums: np.ndarray, counts: np.ndarray
) -> tuple[dict[str, np.ndarray], list[int]]:
    """FedNCM (Legate et al., NeurIPS 2023): the linear classifier of ``arrays`` set from the
    federation's class means of the features it sees, as a nearest-class-mean rule by cosine:
    each class's weight row is its mean's direction and its bias 0. Classes no client could
    share keep their random rows. Returns (the new arrays, the classes that were set)."""
    updated = {name: np.array(value, dtype=np.float32, copy=True) for name, value in arrays.items()}
    weight, bias = updated["classifier.weight"], updated["classifier.bias"]
    known = [c for c in range(len(counts)) if counts[c] > 0]
    for c in known:
        mean = sums[c] / counts[c]
        weight[c] = mean / max(float(np.linalg.norm(mean)), 1e-12)
        bias[c] = 0.0
    return updated, known


def report_of(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> ClassificationReport:
    """Metrics of (n, classes) probabilities; the loss is their mean cross-entropy."""
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return classification_report(np.zeros(0), np.zeros(0), num_classes, loss=float("nan"))
    picked = probabilities[np.arange(len(y)), y]
    loss = float(-np.log(np.maximum(picked, 1e-12)).mean())
    return classification_report(y, probabilities.argmax(1), num_classes, loss=loss)


class NumpyHead:
    """The head after the pooled features (``cut`` 0): PowerNorm, then a linear layer or
    Linear-ReLU-Dropout-Linear, as float32 arrays under torch's names.

    Parameters
    ----------
    kind
        ``linear`` or ``mlp``.
    arrays
        Its weights by name (``initial`` makes seeded ones).
    """

    def __init__(self, kind: HeadKind, arrays: Mapping[str, np.ndarray]) -> None:
        self.kind = kind
        self.layers = layer_names(kind)
        self.params = {name: np.array(value, dtype=np.float32, copy=True) for name, value in arrays.items()}

    @classmethod
    def initial(cls, kind: HeadKind, in_dim: int, num_classes: int, hidden: int = 256, seed: int = 0) -> NumpyHead:
        return cls(kind, initial_arrays(kind, in_dim, num_classes, hidden, seed))

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays that travel: float32 copies, by name."""
        return {name: value.copy() for name, value in self.params.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: value.shape for name, value in self.params.items()}

    def copy(self) -> NumpyHead:
        return NumpyHead(self.kind, self.params)

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Take ``arrays`` as the weights; names and shapes must be this head's."""
        if set(arrays) != set(self.params):
            missing, extra = sorted(set(self.params) - set(arrays)), sorted(set(arrays) - set(self.params))
            raise ValueError(
                f"Head arrays do not match the head: missing {missing[:4]}, unexpected {extra[:4]}. "
                "Do the server and this device agree on 'head', 'cut' and the backbone?"
            )
        for name, param in self.params.items():
            value = np.asarray(arrays[name])
            if value.shape != param.shape:
                raise ValueError(f"Head array {name!r} has shape {value.shape}, expected {param.shape}.")
            param[...] = value

    def pooled(self, features: np.ndarray) -> np.ndarray:
        """What the classifier sees: the normalised features, float32."""
        return power_norm(np.asarray(features, dtype=np.float32))

    def last_inputs(self, features: np.ndarray) -> np.ndarray:
        """What the classifier's last linear layer sees of (rows, d) features: the pooled
        features (linear), or the first layer's ReLU (mlp; no dropout): Fed3R's z."""
        pooled = self.pooled(features)
        if self.kind == HeadKind.LINEAR:
            return pooled
        return np.maximum(pooled @ self.params["classifier.0.weight"].T + self.params["classifier.0.bias"], 0)

    def logits(self, pooled: np.ndarray, keep: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits, and the activations the backward pass needs; ``keep`` is a dropout mask."""
        p = self.params
        if self.kind == HeadKind.LINEAR:
            return pooled @ p["classifier.weight"].T + p["classifier.bias"], [pooled]
        hidden = np.maximum(pooled @ p["classifier.0.weight"].T + p["classifier.0.bias"], 0)
        dropped = hidden if keep is None else hidden * keep
        return dropped @ p["classifier.3.weight"].T + p["classifier.3.bias"], [pooled, hidden, dropped]

    def gradients(self, saved: list[np.ndarray], grad_logits: np.ndarray, keep: np.ndarray | None) -> dict:
        """d objective / d each array, from the logits' gradient (backpropagation by hand)."""
        if self.kind == HeadKind.LINEAR:
            return {"classifier.weight": grad_logits.T @ saved[0], "classifier.bias": grad_logits.sum(0)}
        pooled, hidden, dropped = saved
        grad_dropped = grad_logits @ self.params["classifier.3.weight"]
        grad_hidden = (grad_dropped if keep is None else grad_dropped * keep) * (hidden > 0)
        return {
            "classifier.0.weight": grad_hidden.T @ pooled,
            "classifier.0.bias": grad_hidden.sum(0),
            "classifier.3.weight": grad_logits.T @ dropped,
            "classifier.3.bias": grad_logits.sum(0),
        }

    def train(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        epochs: int,
        learning_rate: float,
        batch_size: int,
        weight_decay: float = 0.0,
        proximal_mu: float = 0.0,
        seed: int = 0,
        train: Callable[[str], bool] | None = None,
        class_weights: np.ndarray | None = None,
        logit_offsets: np.ndarray | None = None,
    ) -> TrainResult:
        """common/heads.py's ``train_head`` on NumPy: mini-batch SGD with momentum 0.9 and
        torch's weight decay (added to the gradient), FedProx's proximal term when
        ``proximal_mu > 0``, the mean cross-entropy of each batch; ``features`` is (n, views, d)
        and each epoch sees every example once in a view drawn at random. ``train`` picks the
        arrays that train by name (default: all). Class balance (common/balance.py): each
        example's loss times ``class_weights[label]``, and ``logit_offsets`` added to the logits
        in training only (the reported loss is the objective's)."""
        started = time.perf_counter()
        y = np.asarray(labels, dtype=np.int64)
        names = [name for name in self.params if train is None or train(name)]
        anchor = {name: self.params[name].copy() for name in names} if proximal_mu > 0 else {}
        velocity: dict[str, np.ndarray] = {}
        draws = Draws(seed)
        total_loss, correct = 0.0, 0
        with one_blas_thread():
            for _ in range(epochs):
                total_loss, correct = 0.0, 0
                for x, target in batches(features, y, draws.epoch(len(y), features.shape[1]), batch_size):
                    keep = draws.keep_mask((len(target), self.hidden)) if self.kind == HeadKind.MLP else None
                    logits, saved = self.logits(self.pooled(x), keep)
                    log_probabilities = log_softmax(logits if logit_offsets is None else logits + logit_offsets)
                    rows = np.arange(len(target))
                    weights = np.ones(len(target), np.float32) if class_weights is None else class_weights[target]
                    total_loss += float(-(weights * log_probabilities[rows, target]).sum())
                    correct += int((logits.argmax(1) == target).sum())
                    grad_logits = np.exp(log_probabilities)
                    grad_logits[rows, target] -= 1  # d(sum of cross-entropies) / d logits
                    grad_logits *= weights[:, None]
                    grads = self.gradients(saved, grad_logits / np.float32(len(target)), keep)
                    self._step(names, grads, anchor, velocity, (learning_rate, weight_decay, proximal_mu))
        n = max(len(y), 1)
        return TrainResult(total_loss / n, correct / n, len(y), time.perf_counter() - started)

    @property
    def hidden(self) -> int:
        return int(self.params[f"{self.layers[0]}.bias"].shape[0])

    def _step(
        self,
        names: list[str],
        grads: dict[str, np.ndarray],
        anchor: dict[str, np.ndarray],
        velocity: dict[str, np.ndarray],
        rates: tuple[float, float, float],
    ) -> None:
        """One step of torch.optim.SGD(momentum=0.9, weight_decay=wd) on objective + mu/2 |w - w0|^2."""
        learning_rate, weight_decay, proximal_mu = (np.float32(r) for r in rates)
        for name in names:
            param, grad = self.params[name], grads[name].astype(np.float32, copy=False)
            if name in anchor:
                grad = grad + proximal_mu * (param - anchor[name])
            if weight_decay:
                grad = grad + weight_decay * param
            velocity[name] = grad.copy() if name not in velocity else velocity[name] * np.float32(MOMENTUM) + grad
            param -= learning_rate * velocity[name]

    def predict_proba(self, features: np.ndarray, average_views: bool, batch_size: int = 256) -> np.ndarray:
        """Class probabilities of (n, views, d) features: of the identity view (the first), or
        averaged over every view (test-time augmentation)."""
        chosen = features if average_views else features[:, :1]
        rows = []
        step = max(1, batch_size // max(chosen.shape[1], 1))  # batch_size rows, whatever the number of views
        for start in range(0, len(chosen), step):
            batch = chosen[start : start + step]
            logits, _ = self.logits(self.pooled(batch.reshape(-1, batch.shape[-1])))
            rows.append(softmax(logits).reshape(*batch.shape[:2], -1).mean(1))
        return np.concatenate(rows) if rows else np.zeros((0, self.num_classes), dtype=np.float32)

    @property
    def num_classes(self) -> int:
        return int(self.params[f"{self.layers[-1]}.bias"].shape[0])

    def evaluate(
        self, features: np.ndarray, labels: np.ndarray, num_classes: int, average_views: bool = False
    ) -> ClassificationReport:
        """Metrics on (n, views, d) embeddings; the loss is the mean cross-entropy of the
        (view-averaged) probabilities."""
        if len(labels) == 0:
            return report_of(np.zeros((0, num_classes)), np.zeros(0), num_classes)
        return report_of(self.predict_proba(features, average_views), labels, num_classes)

    def class_sums(
        self, features: np.ndarray, labels: np.ndarray, num_classes: int, min_examples: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """FedNCM's one-shot statistics: per class, the sum of the normalised features the
        classifier sees (each example's mean over its views) and the number of examples. A class
        with fewer than ``min_examples`` examples is left out (zeros), so no sum is close to one
        image's."""
        if self.kind != HeadKind.LINEAR:
            raise ValueError("FedNCM sets a linear classifier; class sums need head='linear'.")
        y = np.asarray(labels, dtype=np.int64)
        sums = np.zeros((num_classes, self.params["classifier.weight"].shape[1]), dtype=np.float32)
        step = max(1, 256 // max(features.shape[1], 1))
        for start in range(0, len(y), step):
            batch = features[start : start + step]
            pooled = self.pooled(batch.reshape(-1, batch.shape[-1])).reshape(*batch.shape[:2], -1).mean(1)
            np.add.at(sums, y[start : start + step], pooled)
        counts = np.bincount(y, minlength=num_classes).astype(np.float32)
        too_few = counts < min_examples
        sums[too_few], counts[too_few] = 0.0, 0.0
        return sums, counts
