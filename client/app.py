"""Flower ClientApp: turns messages into calls on the plain-Python edge client and back."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client.core import EdgeClient, Instructions
from client.privacy import PrivacyViolation, audit, violations
from common import wire
from common.backbones import get_spec
from common.config import NodeConfig, RunConfig
from common.heads import make_head
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
    head_shapes = _head_shapes(msg) if msg.metadata.message_type.startswith("train") else None
    problems = violations(description, head_shapes)
    if problems:
        raise PrivacyViolation("reply refused by the privacy guard: " + "; ".join(problems))
    return reply


def _head_shapes(msg: Message) -> dict[str, tuple[int, ...]]:
    instructions = Instructions.from_record(msg.content[wire.CONFIG])
    head = make_head(
        instructions.head,
        get_spec(instructions.backbone_name).feature_dim,
        instructions.num_classes,
        instructions.mlp_hidden,
    )
    return {name: tuple(p.shape) for name, p in head.classifier.named_parameters()}


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


def _reply(msg: Message, client: EdgeClient, metrics: dict[str, Any], arrays: ArrayRecord | None = None) -> Message:
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
        content[wire.ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer which engine this device runs and which variant of the run's backbone it holds
    (verified, not just present)."""
    question = msg.content.config_records[wire.CONFIG]
    if question.get(wire.QUERY_ACTION) != wire.ACTION_BACKBONE_STATUS:
        raise ValueError(f"Unknown query action {question.get(wire.QUERY_ACTION)!r}; is the server the same version?")
    engine, held = _client(context).backbone_status(str(question[wire.FINGERPRINT]))
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
