"""A message from the server as the board reads it: decoded and checked once, at the board's entry,
into one typed object that the mods (faults, the privacy guard, DP clipping) and the handlers share.

A value the board must not act on raises ProtocolError here, before any work; Flower's runner
turns it into an error reply with the reason, and the board goes on serving.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from common.flower_glue import SECURE_STAGE_RECORD, from_array_record
from common.protocol import (
    ARRAYS,
    BACKBONE,
    CONFIG,
    GOLDEN,
    BackboneQuery,
    GoldenBatch,
    Instructions,
    Phase,
    ProtocolError,
    query_action,
)


@dataclass(frozen=True)
class BoardRequest:
    """What one message asks of this board."""

    kind: str  # Flower's message type without its action: "train", "evaluate" or "query"
    asks: Phase  # train, evaluate, or what a query asks for
    instructions: Instructions | None  # every message but the backbone-status query
    backbone_query: BackboneQuery | None  # the backbone-status query only
    trainable: dict[str, np.ndarray]  # the head (and the backbone's tail at a later cut); {} if none sent
    backbone: dict[str, np.ndarray] | None  # the frozen backbone, for a node that lacks this variant
    golden: GoldenBatch | None  # sent with the backbone: what the node checks its engine on
    secure: bool = False  # a stage of a secure sum (client/secure_sum.py): the reply's part is masked

    @property
    def work(self) -> Instructions:
        """The instructions of a message that asks for work (all but the backbone-status query)."""
        if self.instructions is None:
            raise ProtocolError(f"a {self.kind} message asking for {self.asks} carries no instructions")
        return self.instructions


def decode(msg: Message) -> BoardRequest:
    """The message's request, or ProtocolError naming what is wrong with it."""
    kind = msg.metadata.message_type.split(".")[0]
    if CONFIG not in msg.content.config_records:
        raise ProtocolError(f"a {kind} message lacks its {CONFIG!r} record; is the server the same edgesplit version?")
    record = msg.content.config_records[CONFIG]
    if kind == "query":
        asks = query_action(record)
    elif kind in (Phase.TRAIN, Phase.EVALUATE):
        asks = Phase(kind)
    else:
        raise ProtocolError(f"a board answers train, evaluate and query messages, not {kind!r}")
    arrays = msg.content.array_records
    if asks == Phase.BACKBONE_STATUS:
        return BoardRequest(kind, asks, None, BackboneQuery.from_record(record), {}, None, None)
    return BoardRequest(
        kind=kind,
        asks=asks,
        instructions=Instructions.from_record(record),
        backbone_query=None,
        trainable=from_array_record(arrays[ARRAYS]) if ARRAYS in arrays else {},
        backbone=from_array_record(arrays[BACKBONE]) if BACKBONE in arrays else None,
        golden=GoldenBatch.from_arrays(from_array_record(arrays[GOLDEN])) if GOLDEN in arrays else None,
        secure=SECURE_STAGE_RECORD in msg.content.config_records,
    )


# Each message's request, for as long as the message lives: the first to ask decodes it.
_requests: weakref.WeakKeyDictionary[Message, BoardRequest] = weakref.WeakKeyDictionary()
_lock = threading.Lock()  # Flower's simulation may run several messages in one process at once


def request_of(msg: Message) -> BoardRequest:
    """The message's request: decoded by the first of the mods and handlers that asks, then shared."""
    with _lock:
        request = _requests.get(msg)
    if request is None:
        request = decode(msg)
        with _lock:
            _requests[msg] = request
    return request
