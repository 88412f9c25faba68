"""Faults a simulated client commits on purpose, so that scenario runs and tests can show what
the server does about them: a ClientApp mod, so that the training code has no fault branches.

Set by run-config ``fault-clients`` (by partition id), ``fault-dropout`` and ``fault-delay``; a
client without a partition id (a real board) commits none. Train messages get every fault;
evaluate messages the ones that happen before any work (crash, dropout, straggle). In a secure
sum, a ``drop-at-<stage>`` fault drops out at that stage only, and a poisoning fault spoils the
masked part (the server can only refuse the sum).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.common import ndarray_to_bytes

from client.local_data import LocalData
from client.request import request_of
from client.state import ProcessState
from common import protocol, secure_sum
from common.config import RunConfig
from common.flower_glue import (
    SECURE_STAGE_RECORD,
    ClientAppCallable,
    Mod,
    SecureKey,
    SecureStage,
    from_array_record,
    masked_arrays,
    to_array_record,
)
from common.kinds import FaultKind
from common.protocol import ARRAYS, METRICS

log = logging.getLogger(__name__)

SCALE = 1000.0  # a "scaled-update" client sends global + SCALE * (its honest update)
BEFORE_WORK = (FaultKind.CRASH, FaultKind.DROPOUT, FaultKind.STRAGGLE)
# What a metrics fault adds to every train and evaluate reply.
ODD_METRICS: dict[FaultKind, dict[str, float]] = {
    FaultKind.HOT_BOARD: {protocol.CPU_TEMP_C: 71.5},
    FaultKind.EXTRA_METRIC: {"debug-queue-length": 3.0},
    FaultKind.INF_COUNTS: {protocol.EMBEDDINGS_COMPUTED: float("inf")},
}


class InjectedFault(RuntimeError):
    """A failure this client was told to commit (a crash or a dropout)."""


def fault_of(config: RunConfig, partition_id: int | None, server_round: int) -> FaultKind | None:
    """The fault this client commits in this round, if any; dropouts are drawn per round from
    the run's seed, so a scenario is reproducible."""
    if partition_id is None:
        return None
    if config.fault_dropout > 0:
        draw = np.random.default_rng([config.seed, server_round, partition_id, 0xD809]).random()
        if draw < config.fault_dropout:
            return FaultKind.DROPOUT
    return config.faults().get(partition_id)


def flipped(data: LocalData, num_classes: int) -> LocalData:
    """The local data of a label-flipping client: it trains on class ``C - 1 - y`` instead of ``y``."""
    return data.with_train_labels(tuple(num_classes - 1 - label for label in data.train.labels))


def poison(
    fault: FaultKind, trained: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The arrays a poisoning client sends instead of its honest result."""
    if fault == FaultKind.NAN_UPDATE:
        return {name: np.full_like(value, np.nan) for name, value in trained.items()}
    if fault == FaultKind.SCALED_UPDATE:
        return {
            name: (start[name] + SCALE * (value - start[name])).astype(np.float32) for name, value in trained.items()
        }
    return dict(trained)


# The stage of a secure sum each drop-at fault leaves at.
DROP_AT = {
    SecureStage.SETUP: FaultKind.DROP_AT_SETUP,
    SecureStage.SHARE_KEYS: FaultKind.DROP_AT_SHARE_KEYS,
    SecureStage.COLLECT_MASKED_VECTORS: FaultKind.DROP_AT_COLLECT,
    SecureStage.UNMASK: FaultKind.DROP_AT_UNMASK,
}


def secure_stage(msg: Message) -> str | None:
    """The secure-sum stage ``msg`` asks for, or None for any other message."""
    record = msg.content.config_records.get(SECURE_STAGE_RECORD)
    return None if record is None else str(record.get(SecureKey.STAGE, ""))


def poison_masked(record: ConfigRecord) -> ConfigRecord:
    """A poisoning board's masked part: its honest one scaled (modulo the range), which shifts the
    sum by a value as large as the range, as any part a board makes up would."""
    masked = [np.mod(part * int(SCALE), secure_sum.MOD_RANGE) for part in masked_arrays(record)]
    return ConfigRecord({**dict(record.items()), SecureKey.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in masked]})


def with_metrics(reply: Message, extra: Mapping[str, float]) -> Message:
    """The reply with ``extra`` added to its metrics."""
    if not reply.has_error():
        reply.content[METRICS] = MetricRecord({**dict(reply.content.metric_records[METRICS].items()), **extra})
    return reply


def fault_injector(state: ProcessState) -> Mod:
    """The mod that makes this node commit its fault, if it has one this round.

    Parameters
    ----------
    state
        The ClientApp's process state: a label-flipping client's data is swapped in the
        ``EdgeClient`` the handlers will use.
    """

    def inject_faults(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        phase = msg.metadata.message_type.split(".")[0]
        stage = secure_stage(msg)
        if stage is None and phase not in (MessageType.TRAIN, MessageType.EVALUATE):
            return call_next(msg, context)
        client = state.client(context.run_config, context.node_config)
        if stage is not None:  # a stage of a secure sum: it may drop out here
            listed = (
                client.config.faults().get(client.node.partition_id) if client.node.partition_id is not None else None
            )
            if listed is not None and DROP_AT.get(stage) == listed:
                raise InjectedFault(f"injected fault: {listed}")
            if stage != SecureStage.COLLECT_MASKED_VECTORS:
                return call_next(msg, context)
        if phase not in (MessageType.TRAIN, MessageType.EVALUATE):
            return call_next(msg, context)
        request = request_of(msg)
        instructions = request.work
        fault = fault_of(client.config, client.node.partition_id, instructions.server_round)
        if fault is None or fault in DROP_AT.values():  # (a secure-sum stage's fault: handled above)
            return call_next(msg, context)
        if phase == MessageType.EVALUATE and fault not in (*BEFORE_WORK, *ODD_METRICS):
            return call_next(msg, context)
        if fault in ODD_METRICS:
            return with_metrics(call_next(msg, context), ODD_METRICS[fault])
        if fault in (FaultKind.CRASH, FaultKind.DROPOUT):
            raise InjectedFault(f"injected fault: {fault}")
        if fault == FaultKind.STRAGGLE:
            log.info("injected fault: sleeping %.1fs before replying", client.config.fault_delay)
            time.sleep(client.config.fault_delay)
            return call_next(msg, context)
        if fault == FaultKind.LABEL_FLIP:
            honest = client.data
            client.use_data(flipped(honest, instructions.num_classes))
            try:
                return call_next(msg, context)
            finally:
                client.use_data(honest)
        reply = call_next(msg, context)
        if not reply.has_error() and SECURE_STAGE_RECORD in reply.content.config_records:
            reply.content[SECURE_STAGE_RECORD] = poison_masked(reply.content.config_records[SECURE_STAGE_RECORD])
        elif not reply.has_error():
            trained = from_array_record(reply.content.array_records[ARRAYS])
            reply.content[ARRAYS] = to_array_record(poison(fault, trained, request.trainable))
        return reply

    return inject_faults
