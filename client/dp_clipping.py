"""Differential privacy, the board's half: a train reply's update (its head minus the head it was
sent) is clipped to ``dp-clipping-norm`` before it leaves, with the arithmetic of Flower's fixed
clipping (common/clipping.py). The server adds the noise (server/dp.py).

A ClientApp mod, as Flower's ``fixedclipping_mod`` is, but reading the norm from the typed
instructions and clipping the one record of trainable arrays: Flower 1.41's mod refuses a
message with more than one array record, and a node that lacks the backbone gets it, with the
golden batch, beside the head.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType

from client.request import request_of
from common.clipping import clip_update
from common.flower_glue import ClientAppCallable, from_array_record, to_array_record
from common.protocol import ARRAYS


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip a train reply's update when the instructions ask for DP (``dp-clipping-norm`` > 0)."""
    reply = call_next(msg, context)
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or reply.has_error():
        return reply
    request = request_of(msg)
    norm = request.work.dp_clipping_norm
    if norm > 0 and ARRAYS in reply.content.array_records:
        trained = from_array_record(reply.content.array_records[ARRAYS])
        reply.content.array_records[ARRAYS] = to_array_record(clip_update(trained, request.trainable, norm))
    return reply
