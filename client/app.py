"""Flower ClientApp: turns messages into calls on the plain-Python edge client and back."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.core import EdgeClient, Instructions, edge_client
from common import wire
from common.config import NodeConfig, RunConfig
from common.logs import configure_logging

app = ClientApp()


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _client(context: Context) -> EdgeClient:
    configure_logging()
    return edge_client(RunConfig.from_flower(context.run_config), NodeConfig.from_flower(context.node_config))


def _receive(client: EdgeClient, msg: Message) -> Instructions:
    """Typed instructions; stores the backbone first if the server sent it."""
    instructions = Instructions.from_record(msg.content[wire.CONFIG])
    if wire.BACKBONE in msg.content.array_records:
        state = msg.content.array_records[wire.BACKBONE].to_torch_state_dict()
        client.receive_backbone(instructions.backbone_name, state, instructions)
    return instructions


def _reply(msg: Message, client: EdgeClient, metrics: dict[str, float], arrays: ArrayRecord | None = None) -> Message:
    metrics[wire.BACKBONE_RECEIVED] = int(wire.BACKBONE in msg.content.array_records)
    status = {wire.FINGERPRINT: str(msg.content[wire.CONFIG][wire.FINGERPRINT])}
    if client.data.notes:
        status[wire.DATA_NOTES] = "; ".join(client.data.notes)
    content = RecordDict({wire.METRICS: MetricRecord(metrics), wire.STATUS: ConfigRecord(status)})
    if arrays is not None:
        content[wire.ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer whether this device holds the run's backbone (verified, not just present)."""
    client = _client(context)
    fingerprint = str(msg.content[wire.CONFIG][wire.FINGERPRINT])
    holds = client.backbones.holds(fingerprint)
    return Message(content=RecordDict({wire.METRICS: MetricRecord({wire.HAS_BACKBONE: int(holds)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Embed (once), train the head locally, send back the head and numbers only."""
    client = _client(context)
    instructions = _receive(client, msg)
    arrays, metrics = client.train(from_record(msg.content[wire.ARRAYS]), instructions)
    return _reply(msg, client, metrics, to_record(arrays))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global head on the local test share."""
    client = _client(context)
    instructions = _receive(client, msg)
    metrics = client.evaluate(from_record(msg.content[wire.ARRAYS]), instructions)
    return _reply(msg, client, metrics)
