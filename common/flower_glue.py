"""The one place where ``common/protocol.py``'s plain messages become Flower records and back,
used by both apps. Everything else in ``common/`` is Flower-free.

It also holds the only use of a Flower internal (``wire_bytes``), isolated and dated.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from common.protocol import ConfigMessage


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    # np.ascontiguousarray makes a 0-d array 1-d; keep the shape (a torch state's
    # num_batches_tracked is 0-d, and the backbone fingerprint covers every shape).
    return ArrayRecord(
        {name: Array(np.ascontiguousarray(value).reshape(np.shape(value))) for name, value in arrays.items()}
    )


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def to_config_record(message: ConfigMessage) -> ConfigRecord:
    return ConfigRecord(message.to_record())


def wire_bytes(message: Message) -> int:
    """Bytes of the message's serialized objects (Flower sends each distinct object once).

    Flower 1.41 has no public API for a message's size on the wire; this walks its internal
    ``flwr.supercore.inflatable`` object tree. On a Flower upgrade, check that
    ``get_all_nested_objects`` still exists and that ``deflate()`` is what is pushed; the byte
    counts in BENCHMARKS.md rest on it.
    """
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
