"""The cut: where the frozen backbone ends and the part that trains on the device begins.

``cut`` counts backbone stages that train, from the end: 0 is head only (the pooled features are
cached), 1 adds the last stage (for EfficientNet-Lite0 the 1x1 head convolution, and the feature
map before it is cached), 2 the last two, and so on. The prefix before the cut runs once per
image and view; the tail after it trains with the head and is federated with it.

Batch norm in the tail keeps its pretrained statistics: each layer is folded into a per-channel
scale and shift that train (``FrozenStatsNorm``). So the tail has no buffers, every tensor of it
trains and travels, small or one-class local batches cannot skew statistics, and every party
computes the same function from the same arrays. (The alternative, FedBN's local statistics,
keeps a model per client and leaves the server without one global model to evaluate.)
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from common.backbones import get_spec
from common.cut import check_cut
from common.cut import embedding_space as embedding_space  # re-exported: its home was here
from common.cut import max_cut as max_cut  # re-exported: its home was here
from common.heads import Head, make_head
from common.kinds import HeadKind


class FrozenStatsNorm(nn.Module):
    """A batch-norm layer with its running statistics folded in, then its activation (timm's
    ``BatchNormAct2d`` carries one): ``act(x * scale + shift)`` with ``scale`` and ``shift``
    trainable and starting where the pretrained layer was."""

    def __init__(self, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        assert norm.running_var is not None and norm.running_mean is not None
        with torch.no_grad():
            weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
            bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
            scale = weight / torch.sqrt(norm.running_var + norm.eps)
            shift = bias - norm.running_mean * scale
        self.scale = nn.Parameter(scale.detach().clone())
        self.shift = nn.Parameter(shift.detach().clone())
        self.drop = copy.deepcopy(getattr(norm, "drop", nn.Identity()))
        self.act = copy.deepcopy(getattr(norm, "act", nn.Identity()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        return self.act(self.drop(x))


def split_backbone(backbone: str, model: nn.Module, cut: int) -> tuple[nn.Module, nn.Module | None]:
    """(prefix, tail) of a built backbone. With ``cut`` 0 the prefix is the whole backbone
    (pooled features) and there is no tail; otherwise the prefix ends in a feature map and the
    tail is a trainable copy of the last ``cut`` stages with batch norm folded."""
    check_cut(backbone, cut)
    if cut == 0:
        return model, None
    stages_of = get_spec(backbone).stages
    assert stages_of is not None  # check_cut allows a positive cut only with stages
    stages = stages_of(model)
    prefix = nn.Sequential(*stages[:-cut]).eval()
    tail = fold_batch_norms(copy.deepcopy(nn.Sequential(*stages[-cut:])))
    for param in tail.parameters():
        param.requires_grad_(True)
    return prefix, tail


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """Replace every batch-norm layer inside ``module`` with its ``FrozenStatsNorm``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenStatsNorm(child))
        else:
            fold_batch_norms(child)
    return module


@functools.cache
def _tail_skeleton(backbone: str, cut: int) -> nn.Module | None:
    return split_backbone(backbone, get_spec(backbone).build_architecture(), cut)[1]


def build_head(
    backbone: str,
    cut: int,
    kind: HeadKind,
    num_classes: int,
    hidden: int = 256,
    seed: int = 0,
    model: nn.Module | None = None,
) -> Head:
    """The trainable part of a run: the tail of the backbone ``model`` after the cut (the
    server's pretrained one; by default an untrained skeleton whose values the caller loads from
    the arrays it received), then the classifier."""
    tail = (
        split_backbone(backbone, model, cut)[1] if model is not None else copy.deepcopy(_tail_skeleton(backbone, cut))
    )
    return make_head(kind, get_spec(backbone).feature_dim, num_classes, hidden, seed, tail)
