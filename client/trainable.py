"""The trainable part a message describes: the head, and the backbone's tail at a later cut.

Both the edge client (which trains it) and the privacy guard (which checks what leaves) build it
from the same instructions, so the shapes they agree on cannot drift apart. At ``cut`` 0 it is
the NumPy head: a head-only board never imports torch.
"""

from __future__ import annotations

from common import trainable
from common.protocol import Instructions
from common.trainable import Trainable, make_trainable


def head_for(instructions: Instructions) -> Trainable:
    """The trainable part these instructions describe, its values still to be loaded."""
    return make_trainable(
        instructions.backbone_name,
        instructions.cut,
        instructions.head,
        instructions.num_classes,
        instructions.mlp_hidden,
    )


def trainable_shapes(instructions: Instructions) -> dict[str, tuple[int, ...]]:
    """Name and shape of every array a train reply carries."""
    return trainable.trainable_shapes(
        instructions.backbone_name,
        instructions.cut,
        instructions.head,
        instructions.num_classes,
        instructions.mlp_hidden,
    )
