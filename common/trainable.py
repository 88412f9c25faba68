"""The trainable part of a run, whichever side builds it: the NumPy head at ``cut`` 0, the torch
head (the backbone's tail, then the classifier) at a later cut. Both have the interface below,
so the client and the server call either alike, and only a later cut imports torch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from common.backbones import get_spec
from common.kinds import HeadKind
from common.metrics import ClassificationReport
from common.numpy_head import NumpyHead, TrainResult, head_shapes

if TYPE_CHECKING:
    from torch import nn

    from common.protocol import Instructions

# What a board installs for a later cut or the torch engine (pyproject.toml's extras).
TORCH_EXTRA = "pip install 'edgesplit[edge,torch]'"


class MissingExtra(RuntimeError):
    """This run needs a package this device has not installed; the message names the extra."""


class Trainable(Protocol):
    """What travels and trains: the NumPy head (common/numpy_head.py) or a torch head
    (common/heads.py, ``TorchHead``)."""

    def arrays(self) -> dict[str, np.ndarray]: ...

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def load(self, arrays: Mapping[str, np.ndarray]) -> None: ...

    def copy(self) -> Trainable: ...

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
    ) -> TrainResult: ...

    def predict_proba(self, features: np.ndarray, average_views: bool) -> np.ndarray: ...

    def evaluate(
        self, features: np.ndarray, labels: np.ndarray, num_classes: int, average_views: bool = False
    ) -> ClassificationReport: ...

    def class_sums(
        self, features: np.ndarray, labels: np.ndarray, num_classes: int, min_examples: int = 1
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def last_inputs(self, features: np.ndarray) -> np.ndarray: ...


def require_torch(what: str) -> None:
    """Raise ``MissingExtra`` naming the extra if torch (or timm) is not installed here."""
    missing = [name for name in ("torch", "timm") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtra(
            f"{what} needs {' and '.join(missing)}, which this device has not installed (a head-only board "
            f"runs without them). Install them with: {TORCH_EXTRA}, or run with cut=0 and an ONNX engine."
        )


def make_trainable(
    backbone: str,
    cut: int,
    kind: HeadKind,
    num_classes: int,
    hidden: int = 256,
    seed: int = 0,
    model: nn.Module | None = None,
) -> Trainable:
    """The trainable part of a run, seeded: at ``cut`` 0 the NumPy head on the backbone's pooled
    features; at a later cut the torch head with the tail of ``model`` (see common/split.py)."""
    if cut == 0:
        return NumpyHead.initial(kind, get_spec(backbone).feature_dim, num_classes, hidden, seed)
    require_torch(f"cut={cut} (training the backbone's last stages)")
    from common.heads import TorchHead
    from common.split import build_head

    return TorchHead(build_head(backbone, cut, kind, num_classes, hidden, seed, model))


def trainable_shapes(backbone: str, cut: int, kind: HeadKind, num_classes: int, hidden: int = 256) -> dict[str, Any]:
    """Name and shape of every array of the trainable part (at ``cut`` 0 without building it)."""
    if cut == 0:
        return head_shapes(kind, get_spec(backbone).feature_dim, num_classes, hidden)
    return make_trainable(backbone, cut, kind, num_classes, hidden).shapes()


def last_layer_dim(backbone: str, head: HeadKind, mlp_hidden: int) -> int:
    """The width of what the classifier's last layer sees (Fed3R's z): the backbone's features for
    a linear head, the MLP's hidden units otherwise."""
    return get_spec(backbone).feature_dim if head == HeadKind.LINEAR else mlp_hidden


def trainable_of(instructions: Instructions) -> Trainable:
    """The trainable part a message's instructions describe, its values still to be loaded: what
    the edge client trains, built from the same instructions as the shapes the guard lets out."""
    return make_trainable(
        instructions.backbone_name,
        instructions.cut,
        instructions.head,
        instructions.num_classes,
        instructions.mlp_hidden,
    )


def trainable_shapes_of(instructions: Instructions) -> dict[str, Any]:
    """Name and shape of every array a train reply to these instructions carries (the privacy guard's
    declaration), so that the shapes the client trains and the guard checks cannot drift apart."""
    return trainable_shapes(
        instructions.backbone_name,
        instructions.cut,
        instructions.head,
        instructions.num_classes,
        instructions.mlp_hidden,
    )
