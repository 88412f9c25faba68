"""The trainable part: a small head on cached embeddings, and how it trains and scores."""

from __future__ import annotations

import time
from collections.abc import Mapping
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
    """The trainable part after the cut. Only ``classifier`` has parameters, and they travel."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.norm = PowerNorm()
        self.classifier = classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(features))


def make_head(kind: str, in_dim: int, num_classes: int, hidden: int = 256, seed: int = 0) -> Head:
    """A linear layer or a one-hidden-layer MLP on normalised features, seeded so every party
    that builds it gets the same initial weights."""
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
    return Head(classifier)


def head_arrays(head: nn.Module) -> dict[str, np.ndarray]:
    """The arrays that travel: the head's parameters, float32, by name."""
    return {name: p.detach().cpu().numpy().astype(np.float32, copy=True) for name, p in head.named_parameters()}


def load_head_arrays(head: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    expected = dict(head.named_parameters())
    if set(arrays) != set(expected):
        raise ValueError(f"Head arrays {sorted(arrays)} do not match the head's {sorted(expected)}.")
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
) -> TrainResult:
    """Mini-batch SGD with momentum on embeddings; FedProx's proximal term when ``proximal_mu > 0``."""
    with torch.random.fork_rng():  # dropout draws from the global RNG: seed it, and restore it after
        torch.manual_seed(seed)
        started = time.perf_counter()
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        generator = torch.Generator().manual_seed(seed)
        anchor = [p.detach().clone() for p in head.parameters()]
        optimizer = torch.optim.SGD(head.parameters(), lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        head.train()
        total_loss, correct = 0.0, 0
        for _ in range(epochs):
            total_loss, correct = 0.0, 0
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), batch_size):
                index = order[start : start + batch_size]
                logits = head(x[index])
                loss = loss_fn(logits, y[index])
                objective = loss / len(index)
                if proximal_mu > 0:
                    drift = sum(((p - a) ** 2).sum() for p, a in zip(head.parameters(), anchor, strict=True))
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
def evaluate_head(head: nn.Module, features: np.ndarray, labels: np.ndarray, num_classes: int) -> ClassificationReport:
    """Metrics of the head on embeddings; the loss is the mean cross-entropy."""
    head.eval()
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if len(y) == 0:
        return classification_report(np.zeros(0), np.zeros(0), num_classes, loss=float("nan"))
    logits = head(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    return classification_report(y.numpy(), logits.argmax(1).numpy(), num_classes, loss=loss)
