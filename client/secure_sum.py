"""The board's side of a secure sum (SecAgg+; common/flower_glue.py runs Flower's stages): a ClientApp
mod between the fault injector and the privacy guard.

A secure sum takes four messages. At the first (setup) the board checks that its run agreed to
secure sums, that the sum adds up at least its floor of boards (node config ``min-secure-boards``)
and that no server could rebuild its secrets from fewer than a majority of its neighbours, then
sends its public keys; at the second it sends its secrets' shares, encrypted for its neighbours.
The third is the ordinary train or statistics message: the handler does its work as always, the
privacy guard checks the clear reply, and only then does this mod turn the reply into the board's
part (its arrays, in fixed point, with the weights the server averages by), bound it, mask it and
send the masked part with the status alone: no clear number of images, loss or count leaves. At
the fourth it returns the shares that take the masks off the sum.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from client.agreement import queries_of
from client.privacy import audit
from client.privacy_floor import Refusal
from client.request import request_of
from client.state import ProcessState
from common import secure_sum
from common.config import NodeConfig, RunConfig
from common.flower_glue import (
    SECURE_STAGE_RECORD,
    ClientAppCallable,
    Mod,
    SecureBoard,
    SecureKey,
    SecureStage,
    from_array_record,
)
from common.protocol import (
    ARRAYS,
    BACKBONE_RECEIVED,
    METRICS,
    NUM_EXAMPLES,
    REFUSAL_CODE,
    STATISTICS_RECORDS,
    STATUS,
    Phase,
)

log = logging.getLogger(__name__)


def secure_sums(state: ProcessState) -> Mod:
    """The mod: messages that are no stage of a secure sum pass through untouched."""

    def secure(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if SECURE_STAGE_RECORD not in msg.content.config_records:
            return call_next(msg, context)
        client = state.client(context.run_config, context.node_config)
        try:
            return _stage(msg, context, call_next, client.config, client.node)
        except Refusal as error:
            log.error("refused: %s", error)
            return Message(Error(code=REFUSAL_CODE, reason=f"refused: {error}"), reply_to=msg)

    return secure


def _stage(
    msg: Message, context: Context, call_next: ClientAppCallable, config: RunConfig, node: NodeConfig
) -> Message:
    if not config.secure_sums:
        raise Refusal("this board's run sums in the clear (secure-sums=false): it takes part in no secure sum")
    configs = msg.content.config_records[SECURE_STAGE_RECORD]
    board = SecureBoard(context.state, msg.metadata.dst_node_id)
    stage = board.begin(configs)
    if stage == SecureStage.SETUP:
        check_setup(configs, request_of(msg).asks, config, node)
    if stage != SecureStage.COLLECT_MASKED_VECTORS:
        return _answer(msg, RecordDict({SECURE_STAGE_RECORD: board.answer(configs)}))
    reply = call_next(msg, context)  # the work, through the privacy guard
    if reply.has_error():
        return reply  # this board drops out of the sum; the others' sum goes on without it
    part = part_of(request_of(msg).asks, reply, config.dp)
    problem = secure_sum.part_problem(part, int(board.state.sample_num))
    if problem is not None:
        raise Refusal(f"this board's part cannot go into the sum: {problem}")
    _, arrays = secure_sum.ordered(part)
    metrics = reply.content.metric_records[METRICS]
    content = RecordDict(
        {
            METRICS: MetricRecord({BACKBONE_RECEIVED: metrics.get(BACKBONE_RECEIVED, 0)}),
            STATUS: reply.content.config_records[STATUS],
            SECURE_STAGE_RECORD: board.answer(configs, secure_sum.encode(arrays)),
        }
    )
    return _answer(msg, content)


def _answer(msg: Message, content: RecordDict) -> Message:
    audit(describe_secure(content), msg.metadata.message_type)
    return Message(content, reply_to=msg)


def describe_secure(content: RecordDict) -> dict[str, Any]:
    """What a stage's reply carries, for the audit log: the masked part as byte counts only."""
    return {
        "arrays": {},
        "metrics": {r: dict(rec.items()) for r, rec in content.metric_records.items()},
        "configs": {
            r: {k: (f"{len(v)} value(s)" if isinstance(v, list) else type(v).__name__) for k, v in rec.items()}
            for r, rec in content.config_records.items()
        },
    }


def check_setup(configs: ConfigRecord, asks: Phase, config: RunConfig, node: NodeConfig) -> None:
    """Refuse a secure sum this board did not agree to: of a query its run does not ask, over fewer
    boards than its floor, with a threshold a minority could meet, or in another encoding."""
    if asks not in (Phase.TRAIN, *queries_of(config)):
        raise Refusal(f"this run asks no secure sum of {asks}")
    boards = int(configs[SecureKey.SAMPLE_NUMBER])  # type: ignore[arg-type]
    shares, threshold = int(configs[SecureKey.SHARE_NUMBER]), int(configs[SecureKey.THRESHOLD])  # type: ignore[arg-type]
    if boards < node.min_secure_boards:
        raise Refusal(f"a secure sum over {boards} boards is below this board's floor of {node.min_secure_boards}")
    if 2 * threshold <= shares or threshold > shares or shares > boards:
        raise Refusal(
            f"a threshold of {threshold} of {shares} shares (over {boards} boards) would let a minority of this "
            "board's neighbours rebuild its secrets; it must be a strict majority"
        )
    encoding = (configs[SecureKey.MOD_RANGE], configs[SecureKey.TARGET_RANGE])
    if encoding != (secure_sum.MOD_RANGE, secure_sum.SCALE):
        raise Refusal(f"the sum's encoding {encoding} is not this board's ({secure_sum.MOD_RANGE}, {secure_sum.SCALE})")


def part_of(asks: Phase, reply: Message, dp: bool) -> dict[str, np.ndarray]:
    """The board's part of the sum, from its checked clear reply: a train reply's head weighted by
    its number of examples (by 1 in a DP run, where every update weighs the same) with its weighted
    loss and accuracy; a statistics reply's arrays with its number of images."""
    metrics = reply.content.metric_records[METRICS]
    examples = float(metrics.get(NUM_EXAMPLES, 0))  # type: ignore[arg-type]
    if asks == Phase.TRAIN:
        head = from_array_record(reply.content.array_records[ARRAYS])
        averaged = {key: float(value) for key, value in metrics.items() if isinstance(value, int | float)}
        return secure_sum.weighted_train_part(head, 1.0 if dp else examples, averaged)
    stats = from_array_record(reply.content.array_records[STATISTICS_RECORDS[asks]])
    part = {name: np.asarray(value, dtype=np.float64) for name, value in stats.items()}
    part[secure_sum.NUM_EXAMPLES] = np.array([examples])
    return part
