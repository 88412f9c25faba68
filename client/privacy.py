"""The last check before anything leaves a device: only the declared trainable arrays (or FedNCM's
class statistics, or Fed3R's ridge statistics or the class counts, each to its own query, the
statistics from no fewer images per class than the board's floor), in float32 or float64, the
metrics the protocol names for the message's kind, as single numbers, and short status strings
may go out. ``violations`` is plain Python over a description of the reply, so that it can be
tested alone; ``privacy_guard`` applies it to every reply as a ClientApp mod, with the board's
own floor on how many images a shared statistic may sum over (client/privacy_floor.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Error, Message

from client.privacy_floor import example_floor, floor_violations, gram_floor
from client.redaction import local_paths, without_local_paths
from client.request import BoardRequest, request_of
from common.backbones import get_spec
from common.config import NodeConfig
from common.protocol import (
    ARRAYS,
    CLASS_COUNTS,
    CLASS_STATS,
    METRICS,
    REPLY_METRICS,
    RIDGE_STATS,
    STATUS,
    BackboneStatus,
    ClassCounts,
    ClassStats,
    Phase,
    ReplyStatus,
    RidgeStats,
)
from common.trainable import last_layer_dim, trainable_shapes_of

if TYPE_CHECKING:
    from common.flower_glue import ClientAppCallable

log = logging.getLogger(__name__)

AUDIT_LOG_ENV = "EDGESPLIT_AUDIT_LOG"  # if set: one JSON line per outgoing reply, for audits and tests
MAX_STATUS_CHARS = 1000
STATUS_KEYS = frozenset(ReplyStatus.keys()) | frozenset(BackboneStatus.keys())
FLOAT_DTYPES = ("float32", "float64")  # what any array leaving a board may be (no bytes, no images)

Shape = tuple[int, ...]
# record -> array name -> its shape, or (shape, dtype) where the dtype is fixed too
Shapes = Mapping[str, Mapping[str, Shape | tuple[Shape, str]]]


def _spec(declared: Shape | tuple[Shape, str]) -> tuple[Shape, str | None]:
    """(shape, dtype or None) of a declared array."""
    if len(declared) == 2 and isinstance(declared[0], tuple) and isinstance(declared[1], str):
        return declared[0], declared[1]
    return tuple(declared), None  # type: ignore[arg-type]


class PrivacyViolation(RuntimeError):
    """A reply would carry something other than the declared trainable arrays and numbers."""


def violations(reply: Mapping[str, Any], allowed: Shapes, metric_names: tuple[str, ...] | None = None) -> list[str]:
    """Everything wrong with an outgoing reply.

    ``reply`` describes the message: {"arrays": {record: {name: (shape, dtype)}},
    "metrics": {record: {key: value}}, "configs": {record: {key: value}}}. ``allowed`` are the
    array records this reply may carry, each with exactly these names and shapes (and dtype,
    where declared; any array must be float32 or float64): the trainable arrays after training,
    FedNCM's class statistics after its query, nothing otherwise. ``metric_names`` is the closed
    list of metrics this kind of reply may carry (``protocol.REPLY_METRICS``); None: none.
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
        for name, (shape, dtype) in arrays.items():
            if name not in shapes:
                continue
            declared, declared_dtype = _spec(shapes[name])
            if tuple(shape) != declared:
                problems.append(f"array {name!r} has shape {tuple(shape)}, the declared one is {declared}")
            if str(dtype) not in FLOAT_DTYPES or (declared_dtype is not None and str(dtype) != declared_dtype):
                expected = declared_dtype or " or ".join(FLOAT_DTYPES)
                problems.append(f"array {name!r} has dtype {dtype}, the declared one is {expected}")
    known = frozenset(metric_names or ())
    for record, metrics in reply.get("metrics", {}).items():
        if record != METRICS:
            problems.append(f"metric record {record!r} is not allowed")
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                problems.append(f"metric {key!r} is not a single number")
            elif key not in known:
                problems.append(f"metric {key!r} is not one this reply may carry")
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


def allowed_arrays(request: BoardRequest) -> dict[str, dict[str, tuple[Shape, str]] | dict[str, Shape]]:
    """The array records, names, shapes (and dtypes, where fixed) a reply to ``request`` may carry:
    the trainable arrays after train, the class statistics after FedNCM's query (float32, as both
    are made), the ridge statistics after Fed3R's, the class counts after their own, nothing
    otherwise."""
    if request.asks == Phase.TRAIN:
        shapes = trainable_shapes_of(request.work)
        return {ARRAYS: {name: (shape, "float32") for name, shape in shapes.items()}}
    if request.asks == Phase.CLASS_COUNTS:
        return {CLASS_COUNTS: ClassCounts.shapes(request.work.num_classes)}
    if request.asks in (Phase.CLASS_SUMS, Phase.RIDGE_SUMS):
        instructions = request.work
        feature_dim = get_spec(instructions.backbone_name).feature_dim
        if request.asks == Phase.CLASS_SUMS:
            stats = ClassStats.shapes(instructions.num_classes, feature_dim)
            return {CLASS_STATS: {name: (shape, "float32") for name, shape in stats.items()}}
        dim = last_layer_dim(instructions.backbone_name, instructions.head, instructions.mlp_hidden)
        return {RIDGE_STATS: RidgeStats.shapes(instructions.num_classes, dim)}
    return {}


def statistics_violations(request: BoardRequest, reply: Message, node_config: Mapping[str, Any]) -> list[str]:
    """Fed3R's statistics below this board's own floors, which the server cannot lower: per class,
    and for the Gram matrix as a whole."""
    if request.asks != Phase.RIDGE_SUMS or RIDGE_STATS not in reply.content.array_records or request.secure:
        return []  # a secure sum's floor is its number of boards, checked at its setup (client/secure_sum.py)
    node = NodeConfig.from_flower(node_config)
    record = reply.content.array_records[RIDGE_STATS]
    counts, dim = record["counts"].numpy(), record["sums"].numpy().shape[-1]
    problems = floor_violations(counts, example_floor(request.work.ncm_min_examples, node.min_examples))
    if counts.sum() < (least := gram_floor(node, dim)):
        problems.append(f"a Gram matrix of {counts.sum():.0f} images is below this board's floor of {least}")
    return problems


def describe(reply: Message) -> dict[str, Any]:
    """What ``violations`` checks: array shapes and dtypes, metric and status values."""
    content = reply.content
    return {
        "arrays": {r: {n: (a.shape, a.dtype) for n, a in rec.items()} for r, rec in content.array_records.items()},
        "metrics": {r: dict(rec.items()) for r, rec in content.metric_records.items()},
        "configs": {r: dict(rec.items()) for r, rec in content.config_records.items()},
    }


def privacy_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Check every reply before it leaves: a violation becomes an error reply, carrying nothing. No
    status string, error reason or exception that becomes one carries the board's paths."""
    paths = local_paths(context.node_config, context.run_config)
    try:
        reply = call_next(msg, context)
    except Exception as error:
        shared = without_paths(error, paths)
        if shared is error:
            raise
        raise shared from None
    if reply.has_error():
        told = str(reply.error.reason or "")
        reason = without_local_paths(told, paths)
        return reply if reason == told else Message(Error(reply.error.code, reason), reply_to=msg)
    if STATUS in reply.content.config_records:
        status = reply.content.config_records[STATUS]
        reply.content[STATUS] = ConfigRecord(
            {key: without_local_paths(v, paths) if isinstance(v, str) else v for key, v in status.items()}
        )
    request = request_of(msg)
    description = describe(reply)
    audit(description, msg.metadata.message_type)
    problems = violations(description, allowed_arrays(request), REPLY_METRICS.get(request.kind))
    problems += statistics_violations(request, reply, context.node_config)
    if problems:
        raise PrivacyViolation("reply refused by the privacy guard: " + "; ".join(problems))
    return reply


class BoardError(RuntimeError):
    """What a board's exception says to the server once the board's paths are taken out of it."""


def without_paths(error: Exception, paths: list[str]) -> Exception:
    """``error`` if its message names none of the board's paths; else a BoardError naming its type
    and its message without them (Flower's runner sends an exception's message to the server),
    and the board's own log keeps the original."""
    told = str(error)
    shared = without_local_paths(told, paths)
    if shared == told:
        return error
    log.error("%s: %s (sent to the server without its paths)", type(error).__name__, told, exc_info=error)
    return BoardError(f"{type(error).__name__}: {shared}")


def audit(reply: Mapping[str, Any], message_type: str) -> None:
    path = os.environ.get(AUDIT_LOG_ENV)
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"message_type": message_type, **reply}, default=str) + "\n")
