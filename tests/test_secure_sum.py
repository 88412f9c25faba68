"""Secure sums (SecAgg+ on Flower's primitives): the fixed-point encoding, the protocol between the
server's driver (server/secure_sum.py) and boards running Flower's stages (common/flower_glue.py),
boards dropping out at every stage, parts the server refuses, and the board's own checks."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from client.privacy_floor import Refusal
from client.secure_sum import check_setup
from common import protocol, secure_sum
from common.config import NodeConfig, RunConfig
from common.flower_glue import (
    SECURE_STAGE_RECORD,
    SECURE_STATE_RECORD,
    SecureBoard,
    SecureKey,
    SecureStage,
    act_as,
    mark_pushed,
)
from common.protocol import Phase
from server.secure_sum import SecureSum, SumResult
from tests.protocol_samples import instructions

SHAPES = {"gram": (6,), "sums": (2, 3), secure_sum.NUM_EXAMPLES: (1,)}


def test_fixed_point_sums_signed_values_to_a_millionth() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(0, 1000, 50) for _ in range(7)]
    encoded = [secure_sum.encode([p])[0] for p in parts]
    total = encoded[0]
    for e in encoded[1:]:
        total = np.mod(total + e, secure_sum.MOD_RANGE)
    assert np.abs(secure_sum.decode([total])[0] - np.sum(parts, axis=0)).max() < 7 * 2**-20
    assert all(e.dtype == np.int64 and e.min() >= 0 and e.max() < secure_sum.MOD_RANGE for e in encoded)


def test_a_part_that_could_wrap_the_sum_is_named() -> None:
    limit = secure_sum.part_limit(10)
    assert secure_sum.part_problem({"gram": np.array([limit / 2])}, 10) is None
    assert "gram reaches" in str(secure_sum.part_problem({"gram": np.array([limit * 1.01])}, 10))
    assert "not finite" in str(secure_sum.part_problem({"sums": np.array([np.nan])}, 10))


def test_neighbours_are_everyone_in_a_small_sum_and_a_majority_ring_in_a_large_one() -> None:
    small = secure_sum.neighbours_of(list(range(5)), secure_sum.share_count(5), seed=1)
    assert all(members == set(range(5)) for members in small.values())
    shares = secure_sum.share_count(100)
    large = secure_sum.neighbours_of(list(range(100)), shares, seed=1)
    assert shares == 15 and all(len(m) == 15 and n in m for n, m in large.items())
    assert all(n in large[m] for n, members in large.items() for m in members)  # symmetric
    assert secure_sum.threshold_of(15) == 8 and secure_sum.threshold_of(4) == 3


class BoardGrid:
    """Boards that answer each stage with Flower's SecAgg+ stages (``SecureBoard``) and, at the
    collect stage, their part; a board may drop at one stage (an error reply) or stay silent."""

    def __init__(self, parts: dict[int, dict[str, np.ndarray]], drop: dict[int, str] | None = None) -> None:
        self.parts, self.drop = parts, drop or {}
        self.states = {node: RecordDict() for node in parts}
        self.seen: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            mark_pushed(message)
            self.seen.append(message)
            node = message.metadata.dst_node_id
            configs = message.content.config_records[SECURE_STAGE_RECORD]
            stage = str(configs[SecureKey.STAGE])
            act_as(node)
            try:
                if self.drop.get(node) == stage:
                    reply = Message(Error(code=0, reason=f"dropped at {stage}"), reply_to=message)
                else:
                    board = SecureBoard(self.states[node], node)
                    board.begin(configs)
                    integers = None
                    if stage == SecureStage.COLLECT_MASKED_VECTORS:
                        integers = secure_sum.encode(secure_sum.ordered(self.parts[node])[1])
                    answer = board.answer(configs, integers)
                    content = RecordDict({SECURE_STAGE_RECORD: answer})
                    if stage == SecureStage.COLLECT_MASKED_VECTORS:
                        content[protocol.STATUS] = ConfigRecord({"fingerprint": "f"})
                    reply = Message(content, reply_to=message)
            finally:
                act_as(0)
            mark_pushed(reply)
            replies.append(reply)
        return replies


def collect_messages(nodes: Iterable[int]) -> list[Message]:
    return [
        Message(RecordDict({protocol.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query")
        for n in nodes
    ]


def random_parts(nodes: list[int], seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {n: {name: rng.normal(0, 100, shape) for name, shape in SHAPES.items()} for n in nodes}


def run_sum(grid: BoardGrid, nodes: list[int], check=lambda reply, node: None, min_boards: int = 3, shares: int = 15):
    dropped: list[tuple[int, str, str]] = []
    summing = SecureSum(
        grid, timeout=10, min_boards=min_boards, shares=shares, seed=7, on_dropped=lambda *d: dropped.append(d)
    )
    return summing.run(collect_messages(nodes), SHAPES, check), dropped


@pytest.mark.parametrize("count, shares", [(5, 15), (12, 5)])
def test_the_server_gets_the_sum_of_the_parts_and_no_part(count: int, shares: int) -> None:
    nodes = list(range(101, 101 + count))
    parts = random_parts(nodes)
    grid = BoardGrid(parts)
    act_as(0)
    result, dropped = run_sum(grid, nodes, shares=shares)
    assert result.reason is None and not dropped and result.boards == count
    assert result.total is not None
    for name in SHAPES:
        expected = np.sum([parts[n][name] for n in nodes], axis=0)
        np.testing.assert_allclose(result.total[name], expected, atol=count * 2**-20)
    # what the server saw of each part: masked integers, uncorrelated with the part
    collect = [m for m in grid.seen if str(m.content.config_records[SECURE_STAGE_RECORD][SecureKey.STAGE]) == "unmask"]
    assert len(collect) == count and [s.stage for s in result.stages] == list(SecureStage.all())


@pytest.mark.parametrize("stage", list(SecureStage.all()))
def test_a_board_dropping_at_any_stage_leaves_the_sum_of_the_others(stage: str) -> None:
    nodes = [11, 12, 13, 14, 15, 16]
    parts = random_parts(nodes, seed=3)
    act_as(0)
    result, dropped = run_sum(BoardGrid(parts, drop={13: stage}), nodes)
    assert result.reason is None, result.reason
    in_sum = nodes if stage == SecureStage.UNMASK else [n for n in nodes if n != 13]
    assert result.boards == len(in_sum) and result.total is not None
    np.testing.assert_allclose(
        result.total["sums"], np.sum([parts[n]["sums"] for n in in_sum], axis=0), atol=len(nodes) * 2**-20
    )
    assert [(n, s) for n, s, _ in dropped] == [(13, stage)] and result.dropped == {stage: [13]}


def test_a_refused_part_is_left_out_and_its_masks_come_off() -> None:
    nodes = [1, 2, 3, 4, 5]
    parts = random_parts(nodes, seed=5)
    act_as(0)
    result, dropped = run_sum(BoardGrid(parts), nodes, check=lambda reply, node: "bad status" if node == 2 else None)
    assert result.total is not None and result.boards == 4
    np.testing.assert_allclose(
        result.total["gram"], np.sum([parts[n]["gram"] for n in nodes if n != 2], axis=0), atol=1e-5
    )
    assert dropped == [(2, SecureStage.COLLECT_MASKED_VECTORS, "bad status")]


def test_no_sum_below_min_boards_and_nothing_unmasked() -> None:
    nodes = [1, 2, 3, 4]
    act_as(0)
    grid = BoardGrid(random_parts(nodes), drop={1: SecureStage.COLLECT_MASKED_VECTORS, 2: SecureStage.SETUP})
    result, _ = run_sum(grid, nodes, min_boards=3)
    assert result.total is None and "fewer than min-clients=3" in str(result.reason)
    assert not any(str(m.content.config_records[SECURE_STAGE_RECORD][SecureKey.STAGE]) == "unmask" for m in grid.seen)


# --- the board's own checks (client/secure_sum.py) -------------------------------------------------

AGREED = {"dataset": "folder", "class-names": "ok,crack", "server-test-dir": "/srv", "min-clients": 3}


def _setup(boards: int = 5, shares: int = 5, threshold: int = 3, **changes: object) -> ConfigRecord:
    values = {
        SecureKey.STAGE: SecureStage.SETUP,
        SecureKey.SAMPLE_NUMBER: boards,
        SecureKey.SHARE_NUMBER: shares,
        SecureKey.THRESHOLD: threshold,
        SecureKey.CLIPPING_RANGE: 0.0,
        SecureKey.TARGET_RANGE: secure_sum.SCALE,
        SecureKey.MOD_RANGE: secure_sum.MOD_RANGE,
        SecureKey.MAX_WEIGHT: 0.0,
        **changes,
    }
    return ConfigRecord(values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("keys", "setup", "asks", "refused"),
    [
        ({"secure-sums": True}, _setup(), Phase.TRAIN, None),
        ({"secure-sums": True, "head-init": "lda"}, _setup(), Phase.RIDGE_SUMS, None),
        ({"secure-sums": True}, _setup(), Phase.RIDGE_SUMS, "asks no secure sum of ridge-sums"),
        ({"secure-sums": True}, _setup(boards=2, shares=2, threshold=2), Phase.TRAIN, "below this board's floor of 3"),
        ({"secure-sums": True}, _setup(threshold=2), Phase.TRAIN, "must be a strict majority"),
        ({"secure-sums": True}, _setup(**{SecureKey.MOD_RANGE: 2**32}), Phase.TRAIN, "encoding"),
    ],
)
def test_a_board_takes_part_only_in_the_sums_it_agreed_to(
    keys: dict[str, object], setup: ConfigRecord, asks: Phase, refused: str | None
) -> None:
    config = RunConfig.from_flower({**AGREED, **keys})
    if refused is None:
        check_setup(setup, asks, config, NodeConfig())
        return
    with pytest.raises(Refusal, match=refused):
        check_setup(setup, asks, config, NodeConfig())


def test_a_board_of_a_clear_run_refuses_any_stage_of_a_secure_sum() -> None:
    """Through the real ClientApp: a board whose run sums in the clear keeps its per-board floors
    and takes part in no secure sum (whose floor is the number of boards instead)."""
    from client.app import app

    run_config = {**RunConfig.from_flower(AGREED).to_flower(), "secure-sums": False}
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config=run_config)
    message = Message(
        RecordDict({protocol.CONFIG: ConfigRecord(instructions().to_record()), SECURE_STAGE_RECORD: _setup()}),
        dst_node_id=5,
        message_type="train",
    )
    act_as(0)
    mark_pushed(message)
    act_as(5)
    try:
        reply = app(message, context)
    finally:
        act_as(0)
    assert reply.has_error() and reply.error.code == protocol.REFUSAL_CODE
    assert "secure-sums=false" in str(reply.error.reason)
    assert SECURE_STATE_RECORD not in context.state.config_records  # no keys were made


def test_a_large_federation_is_summed_group_by_group() -> None:
    """Each group is a sum over at least min-boards boards; a group without a sum is left out."""
    nodes = list(range(1, 9))
    parts = random_parts(nodes, seed=9)
    act_as(0)
    grid = BoardGrid(parts, drop={2: SecureStage.SETUP, 4: SecureStage.SETUP})  # group 1 keeps 2 of 4: no sum
    summing = SecureSum(grid, timeout=10, min_boards=3, shares=15, seed=1, on_dropped=lambda *d: None)
    result = SumResult(total=None, boards=0)
    for group in range(2):
        result.add(summing.run(collect_messages(nodes[group::2]), SHAPES, lambda reply, node: None))
    assert result.total is not None and result.boards == 4 and "fewer than min-clients=3" in str(result.reason)
    np.testing.assert_allclose(result.total["sums"], np.sum([parts[n]["sums"] for n in nodes[0::2]], axis=0), atol=1e-5)


class RepeatingGrid(BoardGrid):
    """Every message arrives twice (a re-sent instruction whose first reply was late), and the
    server gets the first copy's reply: the board must answer the second as it did the first."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        first = super().send_and_receive(messages, timeout=timeout)
        copies = [Message(m.content, m.metadata.dst_node_id, m.metadata.message_type) for m in messages]
        second = super().send_and_receive(copies, timeout=timeout)
        for one, other in zip(first, second, strict=True):
            if not one.has_error() and SecureKey.PUBLIC_KEY_1 in one.content.config_records[SECURE_STAGE_RECORD]:
                assert dict(one.content.config_records[SECURE_STAGE_RECORD].items()) == dict(
                    other.content.config_records[SECURE_STAGE_RECORD].items()
                )
        return first


def test_a_re_sent_stage_is_answered_as_before_and_the_sum_holds() -> None:
    nodes = [1, 2, 3, 4]
    parts = random_parts(nodes, seed=11)
    act_as(0)
    result, dropped = run_sum(RepeatingGrid(parts), nodes)
    assert result.total is not None and not dropped and result.boards == 4
    np.testing.assert_allclose(result.total["gram"], np.sum([parts[n]["gram"] for n in nodes], axis=0), atol=1e-5)
