"""Valid protocol messages for tests, with any field overridden."""

from __future__ import annotations

import dataclasses
from typing import Any

from common.kinds import EngineName, HeadKind
from common.preprocess import PreprocessSpec
from common.protocol import Instructions

INSTRUCTIONS = Instructions(
    server_round=1,
    fingerprint="ab" * 32,
    backbone_name="efficientnet_lite0",
    preprocess=PreprocessSpec(image_size=32),
    engine=EngineName.TORCH,
    engine_fingerprint="ab" * 32,
    head=HeadKind.LINEAR,
    mlp_hidden=8,
    cut=0,
    views=("identity",),
    average_views=False,
    num_classes=2,
    local_epochs=1,
    learning_rate=0.01,
    weight_decay=0.0,
    batch_size=4,
    seed=0,
    personal_epochs=0,
    ncm_min_examples=2,
)


def instructions(**overrides: Any) -> Instructions:
    return dataclasses.replace(INSTRUCTIONS, **overrides)
