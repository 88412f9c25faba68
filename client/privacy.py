"""The last check before anything leaves a device: only the declared trainable arrays (or FedNCM's
class statistics, to its query), scalar metrics and short status strings may go out. Plain
Python over a description of the reply, so that it can be tested alone; ``client/app.py``
applies it to every reply as a Flower mod.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from common import wire

AUDIT_LOG_ENV = "EDGESPLIT_AUDIT_LOG"  # if set: one JSON line per outgoing reply, for audits and tests
MAX_STATUS_CHARS = 1000
STATUS_KEYS = frozenset(
    {wire.FINGERPRINT, wire.ENGINE, wire.ENGINE_FINGERPRINT, wire.HELD_FINGERPRINT, wire.DATA_NOTES}
)


class PrivacyViolation(RuntimeError):
    """A reply would carry something other than the declared trainable arrays and numbers."""


def violations(reply: Mapping[str, Any], allowed: Mapping[str, Mapping[str, tuple[int, ...]]]) -> list[str]:
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
        if record != wire.METRICS:
            problems.append(f"metric record {record!r} is not allowed")
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                problems.append(f"metric {key!r} is not a single number")
    for record, config in reply.get("configs", {}).items():
        if record != wire.STATUS:
            problems.append(f"config record {record!r} is not allowed")
            continue
        for key, value in config.items():
            if key not in STATUS_KEYS:
                problems.append(f"status key {key!r} is not allowed")
            elif not isinstance(value, str) or len(value) > MAX_STATUS_CHARS:
                problems.append(f"status {key!r} must be a string of at most {MAX_STATUS_CHARS} characters")
    return problems


def audit(reply: Mapping[str, Any], message_type: str) -> None:
    path = os.environ.get(AUDIT_LOG_ENV)
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"message_type": message_type, **reply}, default=str) + "\n")
