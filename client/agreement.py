"""What a board agreed to: the run config Flower delivered with the run (the app's defaults and the
operator's overrides, fixed for the whole run: the ServerApp cannot change it) and its own node
config. Every request is held to it before any work; what it changes is refused by name, and the
server records the refusal (error code ``REFUSAL_CODE``).

Pinned: the trainable part's shape (backbone, cut, head, its hidden width, the classes), the DP
clipping norm, the privacy floor (a request may raise it, never lower it), and which one-shot
queries the run asks (FedNCM's class sums with head-init 'ncm', ridge sums with 'fed3r' or 'lda',
class counts only where class balance or the label-skew correction needs them, none in a DP run).
A statistics query must carry the run's own initial head, which the board rebuilds from the run's
seed: statistics of what a crafted first layer sees could single out one image.
"""

from __future__ import annotations

import numpy as np

from client.privacy_floor import Refusal
from client.request import BoardRequest
from common.backbones import get_spec
from common.config import RunConfig
from common.kinds import FROM_RIDGE_SUMS, ClassBalance, HeadInit
from common.numpy_head import NumpyHead
from common.protocol import Instructions, Phase


def check_agreed(request: BoardRequest, config: RunConfig) -> None:
    """Refuse ``request`` if it asks for anything the run this board agreed to does not."""
    if request.instructions is None:
        return  # the backbone-status query: names and fingerprints only
    changed = changed_keys(request.instructions, config)
    if changed:
        raise Refusal(f"the instructions change what this board agreed to for the run: {'; '.join(changed)}")
    if request.asks in STATISTICS and request.asks not in queries_of(config):
        raise Refusal(
            f"this run (head-init={config.head_init}, class-balance={config.class_balance}, "
            f"local-prior-correction={config.local_prior_correction}, dp-clipping-norm={config.dp_clipping_norm:g}) "
            f"asks no {request.asks} query"
        )
    if (
        request.asks in (Phase.CLASS_SUMS, Phase.RIDGE_SUMS)
        and config.cut == 0
        and not _is_initial_head(request, config)
    ):
        raise Refusal(
            f"a {request.asks} query must carry the run's initial head (seed {config.seed}): this one is another"
        )


STATISTICS = (Phase.CLASS_SUMS, Phase.RIDGE_SUMS, Phase.CLASS_COUNTS)


def queries_of(config: RunConfig) -> frozenset[Phase]:
    """The one-shot queries a run asks before round 1: none in a DP run (they are not noised)."""
    if config.dp:
        return frozenset()
    if config.head_init == HeadInit.NCM:
        return frozenset({Phase.CLASS_SUMS})
    if config.head_init in FROM_RIDGE_SUMS:
        return frozenset({Phase.RIDGE_SUMS})
    if config.class_balance != ClassBalance.NONE or config.local_prior_correction:
        return frozenset({Phase.CLASS_COUNTS})
    return frozenset()


def changed_keys(instructions: Instructions, config: RunConfig) -> list[str]:
    """Each pinned setting the instructions change, as 'key: asked vs agreed'."""
    pinned = {
        "backbone": (instructions.backbone_name, config.backbone),
        "cut": (instructions.cut, config.cut),
        "head": (instructions.head, config.head),
        "mlp-hidden": (instructions.mlp_hidden, config.mlp_hidden),
        "num-classes": (instructions.num_classes, len(config.classes())),
        "dp-clipping-norm": (instructions.dp_clipping_norm, config.dp_clipping_norm),
    }
    changed = [f"{key}: {asked!r} vs {agreed!r}" for key, (asked, agreed) in pinned.items() if asked != agreed]
    if instructions.ncm_min_examples < config.ncm_min_examples:
        changed.append(f"ncm-min-examples: {instructions.ncm_min_examples} is below {config.ncm_min_examples}")
    return changed


def _is_initial_head(request: BoardRequest, config: RunConfig) -> bool:
    """Whether the request's head is the seeded one the run starts from (a head-only run)."""
    spec = get_spec(config.backbone)
    initial = NumpyHead.initial(config.head, spec.feature_dim, len(config.classes()), config.mlp_hidden, config.seed)
    expected = initial.arrays()
    received = request.trainable
    return set(received) == set(expected) and all(
        np.shape(received[name]) == value.shape and np.array_equal(received[name], value)
        for name, value in expected.items()
    )
