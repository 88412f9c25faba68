"""The trainable part in torch: a small head on cached embeddings (after the backbone's tail at a
later cut), and how it trains and scores. A head-only run uses the same head on NumPy
(common/numpy_head.py), which draws the same random numbers: see ``make_head`` and ``train_head``."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from common.kinds import HeadKind
from common.metrics import ClassificationReport
from common.numpy_head import DROPOUT, HEAD_KINDS, Draws, TrainResult, initial_arrays, report_of
from common.numpy_head import ncm_head_arrays as ncm_head_arrays  # re-exported: its home was here


class MaskedDropout(nn.Module):
    """Dropout whose masks come from ``masks`` (a NumPy ``Draws``, set by ``train_head``), so the
    torch and the NumPy head drop the same units; without a source, ordinary dropout."""

    def __init__(self, p: float = DROPOUT) -> None:
        super().__init__()
        self.p = p
        self.masks: Callable[[tuple[int, ...]], np.ndarray] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.masks is None:
            return nn.functional.dropout(x, self.p, training=True)
        return x * torch.from_numpy(self.masks(tuple(x.shape)))


class PowerNorm(nn.Module):
    """Square root, then L2 normalisation scaled to unit mean square per feature.

    Pooled CNN features are non-negative, heavy-tailed and badly scaled for SGD. This fixed,
    parameter-free map conditions them without statistics of anyone's data, so it needs no extra
    protocol round and is identical on every client and in the exported model. On ELPV it lifts
    both the centralised probe and federated FedAvg by 1-3 points (see BENCHMARKS.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sign(x) * torch.sqrt(torch.abs(x))
        return nn.functional.normalize(x, dim=1) * (x.shape[1] ** 0.5)


class Head(nn.Module):
    """The trainable part after the cut: the backbone's tail (if the cut is later than the
    pooled features), global average pooling, then ``norm`` and ``classifier``. Every parameter
    trains and travels; nothing else does (``norm`` has none, the tail's batch norms are folded)."""

    def __init__(self, classifier: nn.Module, tail: nn.Module | None = None) -> None:
        super().__init__()
        self.tail = tail
        self.norm = PowerNorm()
        self.classifier = classifier

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """The pooled, normalised features the classifier sees."""
        if self.tail is not None:
            features = self.tail(features).mean((2, 3))
        return self.norm(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled(features))


def make_head(
    kind: HeadKind, in_dim: int, num_classes: int, hidden: int = 256, seed: int = 0, tail: nn.Module | None = None
) -> Head:
    """A linear layer or a one-hidden-layer MLP on normalised features (after the backbone's
    ``tail``, if the cut is later), seeded so every party that builds it gets the same weights
    (the NumPy head's: common/numpy_head.py draws them)."""
    if kind == HeadKind.LINEAR:
        classifier: nn.Module = nn.Linear(in_dim, num_classes)
    elif kind == HeadKind.MLP:
        classifier = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), MaskedDropout(DROPOUT), nn.Linear(hidden, num_classes)
        )
    else:
        raise ValueError(f"Unknown head {kind!r}; use one of {HEAD_KINDS}.")
    params = dict(classifier.named_parameters())
    with torch.no_grad():
        for name, value in initial_arrays(kind, in_dim, num_classes, hidden, seed).items():
            params[name.removeprefix("classifier.")].copy_(torch.from_numpy(value))
    return Head(classifier, tail)


def head_arrays(head: nn.Module) -> dict[str, np.ndarray]:
    """The arrays that travel: the head's parameters, float32, by name."""
    return {name: p.detach().cpu().numpy().astype(np.float32, copy=True) for name, p in head.named_parameters()}


def load_head_arrays(head: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    expected = dict(head.named_parameters())
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise ValueError(
            f"Head arrays do not match the head: missing {missing[:4]}, unexpected {extra[:4]}. "
            "Do the server and this device agree on 'head', 'cut' and the backbone?"
        )
    with torch.no_grad():
        for name, param in expected.items():
            value = torch.as_tensor(np.asarray(arrays[name]), dtype=param.dtype)
            if value.shape != param.shape:
                raise ValueError(f"Head array {name!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}.")
            param.copy_(value)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Run with ``count`` torch threads, then restore. A head on pooled features is a few small
    matrix products per batch: one thread does them in ~1 ms, and a second costs more in
    hand-offs than it saves, up to 10x more when other processes share the cores (measured on
    2 cores with the Flower simulation's server processes beside the client)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_head(
    head: nn.Module,
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
    """Mini-batch SGD with momentum on cached embeddings; FedProx's proximal term when
    ``proximal_mu > 0``.

    ``features`` is (n, views, ...): each epoch sees every example once, in a view drawn at
    random, so the views augment without making epochs longer. ``train`` picks the parameters
    that train by name (default: all); the others stay as they came. Batch order, views and
    dropout masks come from ``Draws(seed)``, as in the NumPy head (common/numpy_head.py).
    Class balance (common/balance.py): each example's loss times ``class_weights[label]``, and
    ``logit_offsets`` added to the logits in training only.
    """
    with torch.random.fork_rng(), _threads(1 if getattr(head, "tail", None) is None else torch.get_num_threads()):
        torch.manual_seed(seed)  # anything else random in a tail draws from the global RNG (restored after)
        started = time.perf_counter()
        y = np.asarray(labels, dtype=np.int64)
        draws = Draws(seed)
        dropouts = _draw_dropout_masks(head, draws)
        params = [p for name, p in head.named_parameters() if train is None or train(name)]
        anchor = [p.detach().clone() for p in params]
        optimizer = torch.optim.SGD(params, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
        loss_fn, offsets = _balanced_loss(class_weights, logit_offsets)
        head.train()
        total_loss, correct = 0.0, 0
        try:
            for _ in range(epochs):
                total_loss, correct = 0.0, 0
                order, views = draws.epoch(len(y), features.shape[1])
                for start in range(0, len(y), batch_size):
                    index = order[start : start + batch_size]
                    target = torch.from_numpy(y[index])
                    logits = head(torch.from_numpy(features[index, views[index]].astype(np.float32)))
                    loss = loss_fn(logits if offsets is None else logits + offsets, target)
                    objective = loss / len(index)
                    if proximal_mu > 0:
                        drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                        objective = objective + proximal_mu / 2 * drift
                    optimizer.zero_grad(set_to_none=True)
                    objective.backward()
                    optimizer.step()
                    total_loss += float(loss.detach())
                    correct += int((logits.argmax(1) == target).sum())
        finally:
            for module in dropouts:
                module.masks = None
        head.eval()
        n = max(len(y), 1)
        return TrainResult(total_loss / n, correct / n, len(y), time.perf_counter() - started)


def _draw_dropout_masks(head: nn.Module, draws: Draws) -> list[MaskedDropout]:
    """The head's dropout layers, set to draw their masks from ``draws`` (as the NumPy head does)."""
    dropouts = [module for module in head.modules() if isinstance(module, MaskedDropout)]
    for module in dropouts:
        module.masks = draws.keep_mask
    return dropouts


def _balanced_loss(
    class_weights: np.ndarray | None, logit_offsets: np.ndarray | None
) -> tuple[nn.CrossEntropyLoss, torch.Tensor | None]:
    """The summed cross-entropy, each example's times ``class_weights[label]`` (divided by the batch
    size by the caller), and the logit offsets added in training only (common/balance.py)."""
    weight = None if class_weights is None else torch.from_numpy(np.asarray(class_weights, dtype=np.float32))
    offsets = None if logit_offsets is None else torch.from_numpy(np.asarray(logit_offsets, dtype=np.float32))
    return nn.CrossEntropyLoss(weight=weight, reduction="sum"), offsets


@torch.inference_mode()
def predict_proba(head: nn.Module, features: np.ndarray, average_views: bool, batch_size: int = 256) -> np.ndarray:
    """Class probabilities of (n, views, ...) features: of the identity view (the first), or
    averaged over every view (test-time augmentation)."""
    head.eval()
    chosen = features if average_views else features[:, :1]
    rows = []
    step = max(1, batch_size // max(chosen.shape[1], 1))  # batch_size rows, whatever the number of views
    for start in range(0, len(chosen), step):
        batch = torch.from_numpy(np.ascontiguousarray(chosen[start : start + step])).float()
        logits = head(batch.flatten(0, 1)).unflatten(0, batch.shape[:2])
        rows.append(logits.softmax(-1).mean(1).numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def evaluate_head(
    head: nn.Module, features: np.ndarray, labels: np.ndarray, num_classes: int, average_views: bool = False
) -> ClassificationReport:
    """Metrics of the head on (n, views, ...) embeddings; the loss is the mean cross-entropy of
    the (view-averaged) probabilities."""
    if len(labels) == 0:
        return report_of(np.zeros((0, num_classes)), np.zeros(0), num_classes)
    return report_of(predict_proba(head, features, average_views), labels, num_classes)


@torch.inference_mode()
def class_sums(
    head: Head, features: np.ndarray, labels: np.ndarray, num_classes: int, min_examples: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Per class: the sum of the pooled, normalised features the classifier sees (each example's
    mean over its views) and the number of examples: FedNCM's one-shot statistics. A class with
    fewer than ``min_examples`` examples is left out (zeros), so no sum is close to one image's."""
    head.eval()
    classifier = head.classifier
    assert isinstance(classifier, nn.Linear), "FedNCM sets a linear classifier"  # the config rule
    sums = torch.zeros(num_classes, classifier.in_features)
    step = max(1, 256 // max(features.shape[1], 1))  # 256 rows, whatever the number of views
    for start in range(0, len(labels), step):
        batch = torch.from_numpy(np.ascontiguousarray(features[start : start + step])).float()
        pooled = head.pooled(batch.flatten(0, 1)).unflatten(0, batch.shape[:2]).mean(1)
        sums.index_add_(0, torch.from_numpy(np.asarray(labels[start : start + step], dtype=np.int64)), pooled)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float32)
    too_few = counts < min_examples
    sums[torch.from_numpy(too_few)], counts[too_few] = 0.0, 0.0
    return sums.numpy().astype(np.float32), counts


@torch.inference_mode()
def last_inputs(head: Head, features: np.ndarray) -> np.ndarray:
    """What the classifier's last linear layer sees of (rows, ...) features at the cut: the
    pooled, normalised features (linear), or the first layer's ReLU (mlp; no dropout)."""
    head.eval()
    pooled = head.pooled(torch.from_numpy(np.ascontiguousarray(features)).float())
    classifier = head.classifier
    if isinstance(classifier, nn.Sequential):
        pooled = classifier[1](classifier[0](pooled))
    return pooled.numpy()


class TorchHead:
    """A torch ``Head`` (a later cut: the backbone's tail, then the classifier) behind the
    NumPy head's interface (common/trainable.py), so the client and the server call either alike."""

    def __init__(self, head: Head) -> None:
        self.module = head

    def arrays(self) -> dict[str, np.ndarray]:
        return head_arrays(self.module)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in self.module.named_parameters()}

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        load_head_arrays(self.module, arrays)

    def copy(self) -> TorchHead:
        return TorchHead(copy.deepcopy(self.module))

    def train(self, features: np.ndarray, labels: np.ndarray, *args: Any, **kwargs: Any) -> TrainResult:
        return train_head(self.module, features, labels, *args, **kwargs)

    def predict_proba(self, features: np.ndarray, average_views: bool) -> np.ndarray:
        return predict_proba(self.module, features, average_views)

    def evaluate(
        self, features: np.ndarray, labels: np.ndarray, num_classes: int, average_views: bool = False
    ) -> ClassificationReport:
        return evaluate_head(self.module, features, labels, num_classes, average_views)

    def class_sums(
        self, features: np.ndarray, labels: np.ndarray, num_classes: int, min_examples: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        return class_sums(self.module, features, labels, num_classes, min_examples)

    def last_inputs(self, features: np.ndarray) -> np.ndarray:
        return last_inputs(self.module, features)
