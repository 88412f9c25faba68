"""The trainable part a message describes: the head, and the backbone's tail at a later cut.

Both the edge client (which trains it) and the privacy guard (which checks what leaves) build it
from the same instructions, so the shapes they agree on cannot drift apart.
"""

from __future__ import annotations

from common.heads import Head
from common.protocol import Instructions
from common.split import build_head


def head_for(instructions: Instructions) -> Head:
    """The trainable part these instructions describe, its values still to be loaded."""
    return build_head(
        instructions.backbone_name,
        instructions.cut,
        instructions.head,
        instructions.num_classes,
        instructions.mlp_hidden,
    )


def trainable_shapes(instructions: Instructions) -> dict[str, tuple[int, ...]]:
    """Name and shape of every array a train reply carries."""
    return {name: tuple(parameter.shape) for name, parameter in head_for(instructions).named_parameters()}
