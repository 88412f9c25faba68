"""The last check before anything leaves a device: only the declared trainable arrays (or FedNCM's
class statistics, or Fed3R's ridge statistics, each to its own query and the latter from no
fewer images per class than the board's floor), scalar metrics and short status strings may go out.
``violations`` is plain Python over a description of the reply, so that it can be tested alone;
``privacy_guard`` applies it to every reply as the ClientApp's outermost mod.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from client.trainable import trainable_shapes
from common.backbones import get_spec
from common.protocol import (
    ARRAYS,
    CLASS_COUNTS,
    CLASS_STATS,
    CONFIG,
    METRICS,
    RIDGE_STATS,
    STATUS,
    BackboneStatus,
    ClassCounts,
    ClassStats,
    Instructions,
    QueryAction,
    ReplyStatus,
    RidgeStats,
    query_action,
)

AUDIT_LOG_ENV = "EDGESPLIT_AUDIT_LOG"  # if set: one JSON line per outgoing reply, for audits and tests
MAX_STATUS_CHARS = 1000
STATUS_KEYS = frozenset(ReplyStatus.keys()) | frozenset(BackboneStatus.keys())

Shapes = Mapping[str, Mapping[str, tuple[int, ...]]]  # record -> array name -> shape


class PrivacyViolation(RuntimeError):
    """A reply would carry something other than the declared trainable arrays and numbers."""


def violations(reply: Mapping[str, Any], allowed: Shapes) -> list[str]:
    """Everything wrong with an outgoing reply.

    ``reply`` describes the message: {"arrays": {record: {name: (shape, dtype)}},
    "metrics": {record: {key: value}}, "configs": {record: {key: value}}}. ``allowed`` are the
    array records this reply may carry, each with exactly these names and shapes: the trainable
    arrays after training, FedNCM's class statistics after its query, nothing otherwise.
    """
    problems = []
    for record, arrays in reply.get("arrays", {}).items():
        if record not in allowed:
            problems.append(f"array record {record!r} is not allowed in this reply")
            continue
        shapes = allowed[record]
        if set(arrays) != set(shapes):
            unexpected, missing = sorted(set(arrays) - set(shapes)), sorted(set(shapes) - set(arrays))
            problems.append(
                f"arrays of {record!r} are not the declared ones: unexpected {unexpected}, missing {missing}"
            )
        for name, (shape, _dtype) in arrays.items():
            if name in shapes and tuple(shape) != tuple(shapes[name]):
                problems.append(f"array {name!r} has shape {tuple(shape)}, the declared one is {tuple(shapes[name])}")
    for record, metrics in reply.get("metrics", {}).items():
        if record != METRICS:
            problems.append(f"metric record {record!r} is not allowed")
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                problems.append(f"metric {key!r} is not a single number")
    for record, config in reply.get("configs", {}).items():
        if record != STATUS:
            problems.append(f"config record {record!r} is not allowed")
            continue
        for key, value in config.items():
            if key not in STATUS_KEYS:
                problems.append(f"status key {key!r} is not allowed")
            elif isinstance(value, float):  # the golden check's cosine: one number about the engine
                continue
            elif not isinstance(value, str) or len(value) > MAX_STATUS_CHARS:
                problems.append(f"status {key!r} must be a string of at most {MAX_STATUS_CHARS} characters")
    return problems


def example_floor(requested: int, node_floor: int | None) -> int:
    """The fewest images of a class a node shares statistics of: what the server asks, raised to
    the board's own floor (node-config ``min-examples``, 5 if unset), and never below 2."""
    return max(requested, node_floor or 5, 2)


def node_floor(node_config: Mapping[str, Any]) -> int | None:
    """The board's own floor (node-config ``min-examples``), if it sets one."""
    value = node_config.get("min-examples")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def floor_violations(counts: Any, floor: int) -> list[str]:
    """Classes whose statistics a reply would share from fewer than ``floor`` images."""
    few = [index for index, count in enumerate(np.asarray(counts).ravel()) if 0 < count < floor]
    return [f"statistics of class(es) {few} come from fewer than {floor} images"] if few else []


def _query_action(msg: Message) -> QueryAction | None:
    if msg.metadata.message_type.split(".")[0] != MessageType.QUERY:
        return None
    return query_action(msg.content.config_records[CONFIG])


def allowed_arrays(msg: Message) -> dict[str, dict[str, tuple[int, ...]]]:
    """The array records, names and shapes a reply to ``msg`` may carry: the trainable arrays
    after train, the class statistics after FedNCM's query, the ridge statistics after Fed3R's,
    nothing otherwise."""
    if msg.metadata.message_type.split(".")[0] == MessageType.TRAIN:
        return {ARRAYS: trainable_shapes(Instructions.from_record(msg.content.config_records[CONFIG]))}
    action = _query_action(msg)
    if action == QueryAction.CLASS_COUNTS:
        num_classes = Instructions.from_record(msg.content.config_records[CONFIG]).num_classes
        return {CLASS_COUNTS: ClassCounts.shapes(num_classes)}
    if action in (QueryAction.CLASS_SUMS, QueryAction.RIDGE_SUMS):
        instructions = Instructions.from_record(msg.content.config_records[CONFIG])
        feature_dim = get_spec(instructions.backbone_name).feature_dim
        if action == QueryAction.CLASS_SUMS:
            return {CLASS_STATS: ClassStats.shapes(instructions.num_classes, feature_dim)}
        # what the last layer sees: the features (linear head) or the MLP's hidden units
        dim = feature_dim if instructions.head == "linear" else instructions.mlp_hidden
        return {RIDGE_STATS: RidgeStats.shapes(instructions.num_classes, dim)}
    return {}


def statistics_violations(msg: Message, reply: Message, node_config: Mapping[str, Any]) -> list[str]:
    """Fed3R's statistics below the floor: this board's own, which the server cannot lower."""
    if _query_action(msg) != QueryAction.RIDGE_SUMS or RIDGE_STATS not in reply.content.array_records:
        return []
    requested = Instructions.from_record(msg.content.config_records[CONFIG]).ncm_min_examples
    counts = reply.content.array_records[RIDGE_STATS]["counts"].numpy()
    return floor_violations(counts, example_floor(requested, node_floor(node_config)))


def describe(reply: Message) -> dict[str, Any]:
    """What ``violations`` checks: array shapes and dtypes, metric and status values."""
    content = reply.content
    return {
        "arrays": {r: {n: (a.shape, a.dtype) for n, a in rec.items()} for r, rec in content.array_records.items()},
        "metrics": {r: dict(rec.items()) for r, rec in content.metric_records.items()},
        "configs": {r: dict(rec.items()) for r, rec in content.config_records.items()},
    }


def privacy_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Check every reply before it leaves: a violation becomes an error reply, carrying nothing."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    description = describe(reply)
    audit(description, msg.metadata.message_type)
    problems = violations(description, allowed_arrays(msg)) + statistics_violations(msg, reply, context.node_config)
    if problems:
        raise PrivacyViolation("reply refused by the privacy guard: " + "; ".join(problems))
    return reply


def audit(reply: Mapping[str, Any], message_type: str) -> None:
    path = os.environ.get(AUDIT_LOG_ENV)
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"message_type": message_type, **reply}, default=str) + "\n")
