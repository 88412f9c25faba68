"""Flower ClientApp: turns messages into calls on the plain-Python edge client and back.

The process state (client/state.py) is the only thing kept between messages. Every message's
config is decoded and checked once (common/protocol.py): a value this board must not act on
raises ProtocolError, which Flower's runner turns into an error reply with the reason, and the
board goes on serving. The privacy guard checks every reply of the honest code; the injected
faults of simulated clients act outside it, as a faulty board's own code would.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.dp_clipping import dp_clipping_mod
from client.edge_client import EdgeClient
from client.faults import fault_injector
from client.privacy import example_floor, node_floor, privacy_guard
from client.state import process_state
from common.config import ConfigError
from common.data import DataError
from common.engines import GoldenCheckFailed
from common.flower_glue import from_array_record, to_array_record, to_config_record
from common.protocol import (
    ARRAYS,
    BACKBONE,
    BACKBONE_RECEIVED,
    CLASS_COUNTS,
    CLASS_STATS,
    CONFIG,
    GOLDEN,
    METRICS,
    NUM_EXAMPLES,
    RIDGE_STATS,
    SETUP_ERROR_CODE,
    STATUS,
    BackboneQuery,
    GoldenBatch,
    Instructions,
    Phase,
    query_action,
)

state = process_state()
inject_faults = fault_injector(state)
# Clipping runs on the honest reply and the guard checks what it leaves; an injected fault then
# stands for a board that neither clips nor guards.
app = ClientApp(mods=[inject_faults, privacy_guard, dp_clipping_mod])
log = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]


def setup_errors_as_replies(handler: Handler) -> Handler:
    """A node that cannot take part as configured (its data, its node config) answers with an
    error reply that says why, coded so that the server reports it once and does not retry for
    it; not with a traceback per message."""

    @functools.wraps(handler)
    def answer(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (DataError, ConfigError) as error:
            log.error("cannot take part as configured: %s", error)
            return Message(Error(code=SETUP_ERROR_CODE, reason=f"{type(error).__name__}: {error}"), reply_to=msg)

    return answer


def _client(context: Context) -> EdgeClient:
    return state.client(context.run_config, context.node_config)


def _receive(client: EdgeClient, msg: Message) -> Instructions:
    """Typed instructions; keeps the backbone first if the server sent it."""
    instructions = Instructions.from_record(msg.content.config_records[CONFIG])
    records = msg.content.array_records
    if BACKBONE in records:
        golden = GoldenBatch.from_arrays(from_array_record(records[GOLDEN])) if GOLDEN in records else None
        client.receive_backbone(from_array_record(records[BACKBONE]), instructions, golden)
    return instructions


def _arrays(msg: Message) -> dict[str, Any]:
    return from_array_record(msg.content.array_records[ARRAYS])


def _reply(
    msg: Message,
    client: EdgeClient,
    instructions: Instructions,
    metrics: dict[str, Any],
    arrays: tuple[str, ArrayRecord] | None = None,
) -> Message:
    """A train, evaluate or class-sums reply: metrics, the status and (optionally) one array record."""
    metrics[BACKBONE_RECEIVED] = int(BACKBONE in msg.content.array_records)
    content = RecordDict({METRICS: MetricRecord(metrics), STATUS: to_config_record(client.reply_status(instructions))})
    if arrays is not None:
        content[arrays[0]] = arrays[1]
    return Message(content=content, reply_to=msg)


def _refusal(msg: Message, client: EdgeClient, instructions: Instructions, failed: GoldenCheckFailed) -> Message:
    """The engine failed its golden check: no update, and the status says so and what follows (the
    server refuses the reply and asks for the node's engine again)."""
    status = dataclasses.replace(client.reply_status(instructions), golden_cosine=failed.cosine, fallback=str(failed))
    metrics: dict[str, Any] = {NUM_EXAMPLES: 0, BACKBONE_RECEIVED: int(BACKBONE in msg.content.array_records)}
    return Message(content=RecordDict({METRICS: MetricRecord(metrics), STATUS: to_config_record(status)}), reply_to=msg)


@app.query()
@setup_errors_as_replies
def query(msg: Message, context: Context) -> Message:
    """Answer which engine this device runs and which variant of the run's backbone it holds
    (verified, not just present); or send the local statistics FedNCM or Fed3R asks for."""
    question = msg.content.config_records[CONFIG]
    client = _client(context)
    if query_action(question) == Phase.CLASS_SUMS:
        instructions = _receive(client, msg)
        try:
            stats, metrics = client.class_sums(_arrays(msg), instructions)
        except GoldenCheckFailed as failed:
            return _refusal(msg, client, instructions, failed)
        return _reply(msg, client, instructions, metrics, (CLASS_STATS, to_array_record(stats.to_arrays())))
    if query_action(question) == Phase.CLASS_COUNTS:
        instructions = _receive(client, msg)
        counts, metrics = client.class_counts(instructions)
        return _reply(msg, client, instructions, metrics, (CLASS_COUNTS, to_array_record(counts.to_arrays())))
    if query_action(question) == Phase.RIDGE_SUMS:
        instructions = _receive(client, msg)
        floor = example_floor(instructions.ncm_min_examples, node_floor(context.node_config))
        try:
            ridge, metrics = client.ridge_sums(_arrays(msg), instructions, floor)
        except GoldenCheckFailed as failed:
            return _refusal(msg, client, instructions, failed)
        return _reply(msg, client, instructions, metrics, (RIDGE_STATS, to_array_record(ridge.to_arrays())))
    asked = BackboneQuery.from_record(question)
    answer = client.backbone_status(asked.fingerprint, asked.cut)
    return Message(content=RecordDict({STATUS: to_config_record(answer)}), reply_to=msg)


@app.train()
@setup_errors_as_replies
def train(msg: Message, context: Context) -> Message:
    """Embed (once), train the head locally, send back the head and numbers only."""
    client = _client(context)
    instructions = _receive(client, msg)
    try:
        arrays, metrics = client.train(_arrays(msg), instructions)
    except GoldenCheckFailed as failed:
        return _refusal(msg, client, instructions, failed)
    return _reply(msg, client, instructions, metrics, (ARRAYS, to_array_record(arrays)))


@app.evaluate()
@setup_errors_as_replies
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global head on the local test share."""
    client = _client(context)
    instructions = _receive(client, msg)
    try:
        metrics = client.evaluate(_arrays(msg), instructions)
    except GoldenCheckFailed as failed:
        return _refusal(msg, client, instructions, failed)
    return _reply(msg, client, instructions, metrics)
