"""Flower ClientApp: turns messages into calls on the plain-Python edge client and back.

The process state (client/state.py) is the only thing kept between messages. Every message is
decoded and checked once (client/request.py) into the request the mods and handlers share: a value
this board must not act on raises ProtocolError, which Flower's runner turns into an error reply
with the reason, and the board goes on serving. The privacy guard checks every reply of the honest
code; the injected faults of simulated clients act outside it, as a faulty board's own code would.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.agreement import check_agreed
from client.dp_clipping import dp_clipping
from client.edge_client import EdgeClient
from client.faults import fault_injector
from client.privacy import privacy_guard
from client.privacy_floor import Refusal, example_floor, gram_floor
from client.request import BoardRequest, request_of
from client.secure_sum import secure_sums
from client.state import process_state
from common.config import ConfigError
from common.data import DataError
from common.engines import GoldenCheckFailed
from common.flower_glue import to_array_record, to_config_record
from common.protocol import (
    ARRAYS,
    BACKBONE_RECEIVED,
    CLASS_COUNTS,
    CLASS_STATS,
    METRICS,
    NUM_EXAMPLES,
    REFUSAL_CODE,
    RIDGE_STATS,
    SETUP_ERROR_CODE,
    STATUS,
    Instructions,
    Phase,
)
from common.trainable import last_layer_dim

state = process_state()
inject_faults = fault_injector(state)
# Clipping runs on the honest reply and the guard checks what it leaves; a secure sum then masks
# the checked reply (client/secure_sum.py); an injected fault stands for a board that neither
# clips nor guards.
app = ClientApp(mods=[inject_faults, secure_sums(state), privacy_guard, dp_clipping(state)])
log = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]


def setup_errors_as_replies(handler: Handler) -> Handler:
    """A node that cannot take part as configured (its data, its node config), or refuses what it
    is asked (client/agreement.py), answers with an error reply that says why, coded so that the
    server reports it once and does not retry for it; not with a traceback per message."""

    @functools.wraps(handler)
    def answer(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (DataError, ConfigError) as error:
            log.error("cannot take part as configured: %s", error)
            return Message(Error(code=SETUP_ERROR_CODE, reason=f"{type(error).__name__}: {error}"), reply_to=msg)
        except Refusal as error:
            log.error("refused: %s", error)
            return Message(Error(code=REFUSAL_CODE, reason=f"refused: {error}"), reply_to=msg)

    return answer


def _client(context: Context) -> EdgeClient:
    return state.client(context.run_config, context.node_config)


def _receive(client: EdgeClient, request: BoardRequest) -> Instructions:
    """The request's instructions, once held to what this board agreed to; keeps the backbone
    first if the server sent it."""
    check_agreed(request, client.config)
    instructions = request.work
    if request.backbone is not None:
        client.receive_backbone(request.backbone, instructions, request.golden)
    return instructions


def _reply(
    msg: Message,
    client: EdgeClient,
    request: BoardRequest,
    metrics: dict[str, Any],
    arrays: tuple[str, ArrayRecord] | None = None,
) -> Message:
    """A train, evaluate or statistics reply: metrics, the status and (optionally) one array record."""
    metrics[BACKBONE_RECEIVED] = int(request.backbone is not None)
    content = RecordDict({METRICS: MetricRecord(metrics), STATUS: to_config_record(client.reply_status(request.work))})
    if arrays is not None:
        content[arrays[0]] = arrays[1]
    return Message(content=content, reply_to=msg)


def _refusal(msg: Message, client: EdgeClient, request: BoardRequest, failed: GoldenCheckFailed) -> Message:
    """The engine failed its golden check: no update, and the status says so and what follows (the
    server refuses the reply and asks for the node's engine again)."""
    status = dataclasses.replace(client.reply_status(request.work), golden_cosine=failed.cosine, fallback=str(failed))
    metrics: dict[str, Any] = {NUM_EXAMPLES: 0, BACKBONE_RECEIVED: int(request.backbone is not None)}
    return Message(content=RecordDict({METRICS: MetricRecord(metrics), STATUS: to_config_record(status)}), reply_to=msg)


@app.query()
@setup_errors_as_replies
def query(msg: Message, context: Context) -> Message:
    """Answer which engine this device runs and which variant of the run's backbone it holds
    (verified, not just present); or send the local statistics FedNCM or Fed3R asks for."""
    request = request_of(msg)
    client = _client(context)
    if request.backbone_query is not None:
        answer = client.backbone_status(request.backbone_query.fingerprint, request.backbone_query.cut)
        return Message(content=RecordDict({STATUS: to_config_record(answer)}), reply_to=msg)
    instructions = _receive(client, request)
    if request.asks == Phase.CLASS_COUNTS:
        counts, metrics = client.class_counts(instructions)
        return _reply(msg, client, request, metrics, (CLASS_COUNTS, to_array_record(counts.to_arrays())))
    try:
        if request.asks == Phase.CLASS_SUMS:
            stats, metrics = client.class_sums(request.trainable, instructions)
            return _reply(msg, client, request, metrics, (CLASS_STATS, to_array_record(stats.to_arrays())))
        if request.secure:  # in a secure sum the floor is the sum's boards (client/secure_sum.py)
            floor, gram = 1, 0
        else:
            floor = example_floor(instructions.ncm_min_examples, client.node.min_examples)
            gram = gram_floor(
                client.node, last_layer_dim(instructions.backbone_name, instructions.head, instructions.mlp_hidden)
            )
        ridge, metrics = client.ridge_sums(request.trainable, instructions, floor, gram)
        return _reply(msg, client, request, metrics, (RIDGE_STATS, to_array_record(ridge.to_arrays())))
    except GoldenCheckFailed as failed:
        return _refusal(msg, client, request, failed)


@app.train()
@setup_errors_as_replies
def train(msg: Message, context: Context) -> Message:
    """Embed (once), train the head locally, send back the head and numbers only."""
    request = request_of(msg)
    client = _client(context)
    instructions = _receive(client, request)
    try:
        arrays, metrics = client.train(request.trainable, instructions)
    except GoldenCheckFailed as failed:
        return _refusal(msg, client, request, failed)
    return _reply(msg, client, request, metrics, (ARRAYS, to_array_record(arrays)))


@app.evaluate()
@setup_errors_as_replies
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global head on the local test share."""
    request = request_of(msg)
    client = _client(context)
    instructions = _receive(client, request)
    try:
        metrics = client.evaluate(request.trainable, instructions)
    except GoldenCheckFailed as failed:
        return _refusal(msg, client, request, failed)
    return _reply(msg, client, request, metrics)
