"""A run's queries and rounds with secure sums (run config ``secure-sums``): the edgesplit strategy's
collaborators (distribution, screening, DP, the tally) around server/secure_sum.py's protocol.

With secure sums the server screens no single reply, since each is masked: what is clear beside a
part (its status) is checked, each board bounds its own part (client/secure_sum.py), and the sum
is checked as a whole (server/head_init.py's ``sum_problem``; ``mean_of_sum`` for head updates).
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import protocol, secure_sum
from common.flower_glue import SecureStage, from_array_record, to_array_record
from common.kinds import EventKind
from common.protocol import Phase
from server.edgesplit_strategy import EdgeSplitStrategy
from server.nodes import FixedNodesGrid
from server.screening import golden_reason, reply_status
from server.secure_sum import SecureSum, SumResult, mean_of_sum

log = logging.getLogger(__name__)


def summed(
    strategy: EdgeSplitStrategy, phase: Phase, messages: list[Message], grid: Grid, shapes: dict[str, tuple[int, ...]]
) -> SumResult:
    """What ``messages`` ask of their boards, summed with SecAgg+: the server learns the sum over
    the boards whose parts arrived, never one part. A board that drops out is counted as failed,
    and its backbone status is asked again."""
    settings = strategy.secure
    assert settings is not None  # a run with secure sums
    tally, run_log = strategy.tally, strategy.run_log
    server_round = tally.record.round

    def dropped(node: int, stage: str, reason: str) -> None:
        strategy.distributor.forget({node})
        if phase is Phase.TRAIN:
            tally.record.clients_failed += 1
        reason = f"secure sum, {stage}: {reason}"
        run_log.event(EventKind.CLIENT_FAILED, round=server_round, phase=phase.value, node=node, reason=reason)

    prepared = [message for message, _ in strategy.distributor.prepare(list(messages), grid, tally)]
    summing = SecureSum(
        grid,
        timeout=settings.timeout,
        min_boards=strategy.min_clients,
        shares=settings.shares,
        seed=settings.seed + server_round,
        on_dropped=dropped,
    )
    check = lambda reply, node: part_reason(strategy, reply, node)  # noqa: E731
    # A large federation is summed group by group (each group a sum over at least min-clients
    # boards): the server holds one group's masked parts at a time.
    groups = max(1, -(-len(prepared) // settings.group_size))
    result = SumResult(total=None, boards=0)
    for group in range(groups):
        result.add(summing.run(prepared[group::groups], shapes, check))
    if result.total is not None:
        result.reason = None  # a group without a sum is in ``dropped`` and the events; the others count
    for stage in result.stages:  # the collect stage's messages were counted when prepared
        tally.record.bytes_up += stage.bytes_up
        if stage.stage != SecureStage.COLLECT_MASKED_VECTORS:
            tally.record.bytes_down += stage.bytes_down
    run_log.event(EventKind.SECURE_SUM, round=server_round, phase=phase.value, **result.facts())
    return result


def part_reason(strategy: EdgeSplitStrategy, reply: Message, node: int) -> str | None:
    """Why a board's masked part cannot go into the sum, from what is clear beside it: its status
    (the run's backbone, a passed golden check)."""
    status, reason = reply_status(reply)
    if status is None:
        return reason
    screen = strategy.screen
    reason = golden_reason(status, screen.bounds.golden_min_cosine)
    if reason is None and status.fingerprint != screen.expected.fingerprint:
        reason = f"backbone fingerprint {status.fingerprint[:12]} is not the run's"
    screen.note_engine(node, status, refused=reason is not None)
    return reason


def train_secure(
    strategy: EdgeSplitStrategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
) -> ArrayRecord | None:
    """One attempt at a round with secure sums: the sampled boards' weighted heads summed, their
    average checked (``mean_of_sum``) and handed to the inner strategy as the federation's one
    reply (FedAvg and FedProx take it as it is, FedAdam steps from it), or released with noise in
    a DP run. None: no usable sum; the head stays as it was."""
    strategy.tally.begin(server_round)
    strategy.tally.record.secure = True
    start = strategy.start_head = from_array_record(arrays)
    nodes = FixedNodesGrid(grid, strategy.connected(grid))
    messages = list(strategy.inner.configure_train(server_round, arrays, config, nodes))
    shapes = secure_sum.train_part_shapes({name: array.shape for name, array in start.items()})
    result = summed(strategy, Phase.TRAIN, messages, grid, shapes)
    strategy.tally.record.clients_ok = result.boards
    bounds = strategy.screen.bounds
    mean: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    reason = result.reason
    if result.total is not None:
        mean, metrics, reason = mean_of_sum(
            result.total, result.boards, start, bounds.max_weight_norm, bounds.dp_clipping_norm
        )
    if reason is not None:
        strategy.check_setup_errors()
        log.warning("round %d: no usable secure sum (%s); keeping the previous head", server_round, reason)
        strategy.run_log.event(
            EventKind.ROUND_SKIPPED,
            round=server_round,
            usable=result.boards,
            minimum=strategy.min_clients,
            reason=reason,
        )
        return None
    if strategy.privacy is not None:
        released = strategy.privacy.released(
            server_round, start, mean, result.boards, len(messages), strategy.tally.record
        )
        return to_array_record(released)
    federation = Message(
        RecordDict({protocol.ARRAYS: to_array_record(mean), protocol.METRICS: MetricRecord(dict[str, Any](metrics))}),
        dst_node_id=0,
        message_type=MessageType.TRAIN,
    )
    aggregated, _ = strategy.inner.aggregate_train(server_round, [federation])
    return aggregated
