"""FedNCM: the head's classifier from the federation's class means, before round 1.

One query to every connected node for its class statistics under the initial model (embedding
its images on the way, as round 1 would); nodes that fail or send malformed statistics are left
out; with none usable the head stays random."""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import protocol
from common.flower_glue import to_array_record
from common.numpy_head import ncm_head_arrays
from common.protocol import Phase, QueryAction
from server.screening import class_stats_of
from server.strategy import EdgeSplitStrategy

log = logging.getLogger(__name__)


def fedncm_head(strategy: EdgeSplitStrategy, grid: Grid, head: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The initial head with its classifier set from the nodes' class sums (``head`` if none came)."""
    run = strategy.run
    strategy.tally.begin(0)
    started = time.perf_counter()
    question = ConfigRecord(
        {**run.instructions(0, Phase.CLASS_SUMS).to_record(), protocol.ACTION: QueryAction.CLASS_SUMS.value}
    )
    arrays = to_array_record(head)
    messages = [
        Message(
            RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: question}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in strategy.connected(grid)
    ]
    prepared = strategy.prepare(Phase.CLASS_SUMS, messages, grid)
    replies = grid.send_and_receive(prepared, timeout=run.config.round_timeout)
    accepted = strategy.screened(Phase.CLASS_SUMS, replies).accepted
    stats = [class_stats_of(reply) for reply in accepted]
    counts, known = np.zeros(len(run.classes)), list[int]()
    if stats:
        counts = np.sum([s.counts for s in stats], axis=0)
        head, known = ncm_head_arrays(head, np.sum([s.sums for s in stats], axis=0), counts)
    else:
        log.warning("FedNCM: no usable class statistics arrived; the head starts random")
    record = strategy.tally.record
    run.record_initialisation(
        method="ncm",
        nodes=len(accepted),
        classes_set=known,
        class_counts=counts.astype(int).tolist(),
        bytes_down=record.bytes_down,
        bytes_up=record.bytes_up,
        backbones_sent=record.backbones_sent,
        seconds=round(time.perf_counter() - started, 3),
    )
    return head
