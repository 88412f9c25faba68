"""Differential privacy, the board's half: a train reply's update (its head minus the head it was
sent) is clipped to ``dp-clipping-norm`` before it leaves, with the arithmetic of Flower's fixed
clipping (common/clipping.py). The server adds the noise (server/dp.py).

A ClientApp mod, as Flower's ``fixedclipping_mod`` is, but reading the norm from the board's own
run config and clipping the one record of trainable arrays: Flower 1.41's mod refuses a
message with more than one array record, and a node that lacks the backbone gets it, with the
golden batch, beside the head.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType

from client.request import request_of
from client.state import ProcessState
from common.clipping import clip_update
from common.flower_glue import ClientAppCallable, Mod, from_array_record, to_array_record
from common.protocol import ARRAYS


def dp_clipping(state: ProcessState) -> Mod:
    """The mod that clips a train reply's update to ``dp-clipping-norm`` of the board's own run
    config (0: DP off), never to a norm the instructions name (client/agreement.py refuses
    instructions that differ).

    Parameters
    ----------
    state
        The ClientApp's process state: where the node's validated run config is kept.
    """

    def clip_dp_update(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or reply.has_error():
            return reply
        norm = state.client(context.run_config, context.node_config).config.dp_clipping_norm
        if norm > 0 and ARRAYS in reply.content.array_records:
            trained = from_array_record(reply.content.array_records[ARRAYS])
            start = request_of(msg).trainable
            reply.content.array_records[ARRAYS] = to_array_record(clip_update(trained, start, norm))
        return reply

    return clip_dp_update
