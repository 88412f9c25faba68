"""Flower ClientApp: turns messages into calls on the plain-Python edge client and back."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client.core import EdgeClient, Instructions
from client.privacy import PrivacyViolation, audit, violations
from common import wire
from common.backbones import get_spec
from common.config import NodeConfig, RunConfig
from common.logs import configure_logging


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def privacy_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Check every reply before it leaves: a violation becomes an error reply, carrying nothing."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    content = reply.content
    description = {
        "arrays": {r: {n: (a.shape, a.dtype) for n, a in rec.items()} for r, rec in content.array_records.items()},
        "metrics": {r: dict(rec.items()) for r, rec in content.metric_records.items()},
        "configs": {r: dict(rec.items()) for r, rec in content.config_records.items()},
    }
    audit(description, msg.metadata.message_type)
    problems = violations(description, allowed_arrays(msg))
    if problems:
        raise PrivacyViolation("reply refused by the privacy guard: " + "; ".join(problems))
    return reply


def allowed_arrays(msg: Message) -> dict[str, dict[str, tuple[int, ...]]]:
    """The array records, names and shapes a reply to ``msg`` may carry: the trainable arrays
    after train, the class statistics after FedNCM's query, nothing otherwise."""
    kind = msg.metadata.message_type
    if kind.startswith("train"):
        instructions = Instructions.from_record(msg.content[wire.CONFIG])
        return {wire.ARRAYS: _trainable_shapes(instructions)}
    if kind == MessageType.QUERY and msg.content[wire.CONFIG].get(wire.QUERY_ACTION) == wire.ACTION_CLASS_SUMS:
        instructions = Instructions.from_record(msg.content[wire.CONFIG])
        classes, dim = instructions.num_classes, get_spec(instructions.backbone_name).feature_dim
        return {wire.CLASS_STATS: {wire.CLASS_SUMS: (classes, dim), wire.CLASS_COUNTS: (classes,)}}
    return {}


def _trainable_shapes(instructions: Instructions) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in instructions.new_head().named_parameters()}


app = ClientApp(mods=[privacy_guard])


def _client(context: Context) -> EdgeClient:
    """This node's client, configs validated once per process; simulation reuses processes, so
    embeddings stay in memory between rounds."""
    return _client_for(_frozen(context.run_config), _frozen(context.node_config))


def _frozen(config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(config.items()))


@functools.cache
def _client_for(run_config: tuple[tuple[str, Any], ...], node_config: tuple[tuple[str, Any], ...]) -> EdgeClient:
    configure_logging()
    config = RunConfig.from_flower(dict(run_config))
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    return EdgeClient(config, NodeConfig.from_flower(dict(node_config)))


def _receive(client: EdgeClient, msg: Message) -> Instructions:
    """Typed instructions; stores the backbone first if the server sent it."""
    instructions = Instructions.from_record(msg.content[wire.CONFIG])
    if wire.BACKBONE in msg.content.array_records:
        record = msg.content.array_records[wire.BACKBONE]
        if instructions.engine == "torch":
            client.receive_backbone(record.to_torch_state_dict(), instructions)
        else:
            client.receive_backbone(record[wire.ONNX_MODEL].numpy().tobytes(), instructions)
    return instructions


def _reply(
    msg: Message,
    client: EdgeClient,
    metrics: dict[str, Any],
    arrays: ArrayRecord | None = None,
    record: str = wire.ARRAYS,
) -> Message:
    metrics[wire.BACKBONE_RECEIVED] = int(wire.BACKBONE in msg.content.array_records)
    instructions = msg.content[wire.CONFIG]
    status: dict[str, Any] = {
        wire.FINGERPRINT: str(instructions[wire.FINGERPRINT]),
        wire.ENGINE: str(instructions[wire.ENGINE]),
        wire.ENGINE_FINGERPRINT: str(instructions[wire.ENGINE_FINGERPRINT]),
    }
    if client.data.notes:
        status[wire.DATA_NOTES] = "; ".join(client.data.notes)
    content = RecordDict({wire.METRICS: MetricRecord(metrics), wire.STATUS: ConfigRecord(status)})
    if arrays is not None:
        content[record] = arrays
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer which engine this device runs and which variant of the run's backbone it holds
    (verified, not just present); or, for FedNCM, send the local class statistics."""
    question = msg.content.config_records[wire.CONFIG]
    action = question.get(wire.QUERY_ACTION)
    client = _client(context)
    if action == wire.ACTION_CLASS_SUMS:
        instructions = _receive(client, msg)
        stats, metrics = client.class_sums(from_record(msg.content.array_records[wire.ARRAYS]), instructions)
        return _reply(msg, client, metrics, to_record(stats), record=wire.CLASS_STATS)
    if action != wire.ACTION_BACKBONE_STATUS:
        raise ValueError(f"Unknown query action {action!r}; is the server the same version?")
    cut = question.get(wire.CUT, 0)
    engine, held = client.backbone_status(str(question[wire.FINGERPRINT]), cut if isinstance(cut, int) else 0)
    answer = ConfigRecord({wire.ENGINE: engine, wire.HELD_FINGERPRINT: held})
    return Message(content=RecordDict({wire.STATUS: answer}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Embed (once), train the head locally, send back the head and numbers only."""
    client = _client(context)
    instructions = _receive(client, msg)
    arrays, metrics = client.train(from_record(msg.content.array_records[wire.ARRAYS]), instructions)
    return _reply(msg, client, metrics, to_record(arrays))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global head on the local test share."""
    client = _client(context)
    instructions = _receive(client, msg)
    metrics = client.evaluate(from_record(msg.content.array_records[wire.ARRAYS]), instructions)
    return _reply(msg, client, metrics)
