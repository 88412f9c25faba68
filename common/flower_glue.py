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


def run_supernode_with_heartbeat(seconds: float, arguments: list[str]) -> None:
    """``flower-supernode <arguments>`` in this process, declaring a node heartbeat of ``seconds``.

    A SuperNode tells the SuperLink its heartbeat interval (``ActivateNode`` and each
    ``SendNodeHeartbeat`` carry it); the SuperLink counts it offline after two intervals without
    one, and a message waiting for it then gets a "Node Unavailable" reply. Flower 1.41 always sends
    its constant ``HEARTBEAT_DEFAULT_INTERVAL`` (30 s) and offers no flag or environment variable,
    so this sets the constant in the two internal modules of the SuperNode process that read it:
    the node connection, and the heartbeat thread (which sends every (interval - 5 s) x 0.7-0.9).
    ClientApps run in processes of their own and keep theirs. On a Flower upgrade, check that both
    modules still read it (a missing name fails here) and look for a real option.
    """
    import sys

    from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection
    from flwr.supernode.cli import flower_supernode

    if not HEARTBEAT_MIN_INTERVAL <= seconds <= HEARTBEAT_MAX_INTERVAL:
        bounds = f"{HEARTBEAT_MIN_INTERVAL}-{HEARTBEAT_MAX_INTERVAL} s"
        raise ValueError(f"heartbeat interval {seconds:g} s: the SuperLink accepts {bounds}")
    for module in (fleet_http_connection, heartbeat):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise RuntimeError(f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL: see this function")
        setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", seconds)  # noqa: B010  (a module's constant, on purpose)
    sys.argv = ["flower-supernode", *arguments]  # what Flower's parser reads
    flower_supernode()
