"""The trainable part: a small head on cached embeddings, and how it trains and scores."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.metrics import ClassificationReport, classification_report

HEAD_KINDS = ("linear", "mlp")


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
    kind: str, in_dim: int, num_classes: int, hidden: int = 256, seed: int = 0, tail: nn.Module | None = None
) -> Head:
    """A linear layer or a one-hidden-layer MLP on normalised features (after the backbone's
    ``tail``, if the cut is later), seeded so every party that builds it gets the same weights."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "linear":
        classifier: nn.Module = nn.Linear(in_dim, num_classes)
    elif kind == "mlp":
        classifier = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, num_classes)
        )
    else:
        raise ValueError(f"Unknown head {kind!r}; use one of {HEAD_KINDS}.")
    with torch.no_grad():  # re-draw PyTorch's default init from our own generator
        for module in classifier.modules():
            if isinstance(module, nn.Linear):
                bound = 1 / module.in_features**0.5
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.uniform_(-bound, bound, generator=generator)
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


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean cross-entropy over the examples of the last epoch
    accuracy: float  # on the local training examples, during the last epoch
    num_examples: int
    seconds: float


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
) -> TrainResult:
    """Mini-batch SGD with momentum on cached embeddings; FedProx's proximal term when
    ``proximal_mu > 0``.

    ``features`` is (n, views, ...): each epoch sees every example once, in a view drawn at
    random, so the views augment without making epochs longer. ``train`` picks the parameters
    that train by name (default: all); the others stay as they came.
    """
    with torch.random.fork_rng(), _threads(1 if getattr(head, "tail", None) is None else torch.get_num_threads()):
        torch.manual_seed(seed)  # dropout draws from the global RNG: seed it (fork_rng restores it after)
        started = time.perf_counter()
        x = torch.from_numpy(np.ascontiguousarray(features))
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        generator = torch.Generator().manual_seed(seed)
        params = [p for name, p in head.named_parameters() if train is None or train(name)]
        anchor = [p.detach().clone() for p in params]
        optimizer = torch.optim.SGD(params, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        head.train()
        total_loss, correct = 0.0, 0
        for _ in range(epochs):
            total_loss, correct = 0.0, 0
            order = torch.randperm(len(y), generator=generator)
            views = torch.randint(0, x.shape[1], (len(y),), generator=generator)
            for start in range(0, len(y), batch_size):
                index = order[start : start + batch_size]
                logits = head(x[index, views[index]].float())
                loss = loss_fn(logits, y[index])
                objective = loss / len(index)
                if proximal_mu > 0:
                    drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                    objective = objective + proximal_mu / 2 * drift
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                total_loss += float(loss.detach())
                correct += int((logits.argmax(1) == y[index]).sum())
        head.eval()
        n = max(len(y), 1)
        return TrainResult(total_loss / n, correct / n, len(y), time.perf_counter() - started)


@torch.inference_mode()
def predict_proba(head: nn.Module, features: np.ndarray, average_views: bool, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities of (n, views, ...) features: of the identity view (the first), or
    averaged over every view (test-time augmentation)."""
    head.eval()
    chosen = features if average_views else features[:, :1]
    rows = []
    for start in range(0, len(chosen), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(chosen[start : start + batch_size])).float()
        logits = head(batch.flatten(0, 1)).unflatten(0, batch.shape[:2])
        rows.append(logits.softmax(-1).mean(1))
    return torch.cat(rows) if rows else torch.zeros(0)


def evaluate_head(
    head: nn.Module, features: np.ndarray, labels: np.ndarray, num_classes: int, average_views: bool = False
) -> ClassificationReport:
    """Metrics of the head on (n, views, ...) embeddings; the loss is the mean cross-entropy of
    the (view-averaged) probabilities."""
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return classification_report(np.zeros(0), np.zeros(0), num_classes, loss=float("nan"))
    probabilities = predict_proba(head, features, average_views)
    picked = probabilities[torch.arange(len(y)), torch.from_numpy(y)]
    loss = float(-torch.log(picked.clamp_min(1e-12)).mean())
    return classification_report(y, probabilities.argmax(1).numpy(), num_classes, loss=loss)


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
    for start in range(0, len(labels), 256):
        batch = torch.from_numpy(np.ascontiguousarray(features[start : start + 256])).float()
        pooled = head.pooled(batch.flatten(0, 1)).unflatten(0, batch.shape[:2]).mean(1)
        sums.index_add_(0, torch.from_numpy(np.asarray(labels[start : start + 256], dtype=np.int64)), pooled)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float32)
    too_few = counts < min_examples
    sums[torch.from_numpy(too_few)], counts[too_few] = 0.0, 0.0
    return sums.numpy().astype(np.float32), counts


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
