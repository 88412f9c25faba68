"""The ServerApp's grid notices replies within a fraction of a second, bounds its wait, and
recovers lost or overdue replies within the round (server/nodes.py, server/delivery.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.flower_glue import ErrorCode, act_as, mark_pushed
from server import delivery
from server.delivery import Delivery
from server.nodes import FixedNodesGrid, PromptGrid

# How a node answers the n-th copy (0, 1, ...) of its instruction: (seconds after the push, a
# reply or an Error), or None for a reply that never comes.
Answer = Callable[[int, int], "tuple[float, Error | float] | None"]


class FleetGrid:
    """Nodes answering through a fake SuperLink, each as ``answer`` says."""

    def __init__(self, answer: Answer) -> None:
        self.answer, self.pulls = answer, 0
        self.pushed: list[tuple[str, Message, float, int]] = []  # (id, message, when, copy number)

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            copy = sum(1 for _, m, _, _ in self.pushed if m.metadata.dst_node_id == node)
            message_id = f"m{len(self.pushed)}"
            mark_pushed(message, message_id)  # what Flower does on push
            self.pushed.append((message_id, message, time.monotonic(), copy))
            ids.append(message_id)
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        wanted, replies = set(ids), []
        for message_id, message, pushed_at, copy in self.pushed:
            answer = self.answer(message.metadata.dst_node_id, copy)
            if message_id not in wanted or answer is None or time.monotonic() - pushed_at < answer[0]:
                continue
            body = answer[1]
            act_as(message.metadata.dst_node_id)  # the replying node, as in a ClientApp
            content = body if isinstance(body, Error) else RecordDict({"metrics": MetricRecord({"value": body})})
            replies.append(Message(content, reply_to=message))
        return replies


@pytest.fixture(autouse=True)
def task_identity() -> None:
    act_as(0)


def _messages(*nodes: int) -> list[Message]:
    """Round 4's train messages as Flower 1.42's strategies make them: the round in the config
    record, not in the group id."""
    return [Message(RecordDict({"config": ConfigRecord({"server-round": 4})}), node, "train") for node in nodes]


def _values(replies: list[Message]) -> dict[int, Any]:
    return {r.metadata.src_node_id: r.content["metrics"]["value"] for r in replies if not r.has_error()}


def test_replies_are_noticed_within_one_poll_of_arriving() -> None:
    grid = FleetGrid(lambda node, copy: (0.3, float(node)))
    started = time.monotonic()
    replies = list(PromptGrid(grid, poll=0.05).send_and_receive(_messages(1, 2), timeout=10))  # type: ignore[arg-type]
    assert _values(replies) == {1: 1.0, 2: 2.0}
    assert 0.3 <= time.monotonic() - started < 1.0 and grid.pulls >= 3


def test_a_silent_node_bounds_the_wait_by_the_timeout_and_the_others_are_kept() -> None:
    grid = FleetGrid(lambda node, copy: None if node == 2 else (0.0, 1.0))
    started = time.monotonic()
    replies = list(PromptGrid(grid, poll=0.05).send_and_receive(_messages(1, 2), timeout=0.4))  # type: ignore[arg-type]
    assert _values(replies) == {1: 1.0}
    assert 0.4 <= time.monotonic() - started < 1.5
    assert len(grid.pushed) == 2  # no history for node 2 yet: not overdue, nothing re-sent


def test_a_reply_reported_lost_is_recovered_by_sending_again() -> None:
    lost = Error(code=ErrorCode.REPLY_MESSAGE_UNAVAILABLE, reason="The reply message has expired.")
    grid = FleetGrid(lambda node, copy: (0.0, lost) if node == 2 and copy == 0 else (0.0, 10.0 + copy))
    events: list[tuple[str, dict[str, Any]]] = []
    sent = _messages(1, 2)
    replies = Delivery(grid, 0.02, lambda kind, **f: events.append((kind, f))).send_and_receive(sent, 5)  # type: ignore[arg-type]
    assert _values(replies) == {1: 10.0, 2: 11.0}  # node 2's answer to the second copy
    assert {r.metadata.reply_to_message_id for r in replies} == {m.metadata.message_id for m in sent}
    assert [kind for kind, _ in events] == ["message-resent", "reply-recovered"]
    assert events[0][1]["round"] == 4 and "reply lost" in events[0][1]["reason"] and events[0][1]["node"] == 2


def test_an_overdue_reply_is_sent_again_by_the_nodes_own_deadline_and_counted_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(delivery, "OVERDUE_MIN_SECONDS", 0.1)
    # Round 1: node 2 answers in 0.05 s. Round 2: its first copy is lost without a word.
    rounds = {"now": 1}
    grid = FleetGrid(lambda node, copy: None if (rounds["now"], node, copy) == (2, 2, 1) else (0.05, float(copy)))
    events: list[str] = []
    channel = Delivery(grid, 0.02, lambda kind, **f: events.append(kind))
    channel.send_and_receive(_messages(1, 2), 5)  # type: ignore[arg-type]
    assert 0.1 <= (channel.deadline(2) or 0) < 0.6  # 3x its ~0.05 s reply, at least the minimum
    rounds["now"] = 2
    started = time.monotonic()
    replies = channel.send_and_receive(_messages(1, 2), 5)  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0  # not the 5 s timeout
    assert _values(replies) == {1: 1.0, 2: 2.0} and len(replies) == 2  # one per node: the re-sent copy's
    assert events == ["message-resent", "reply-recovered"]


def test_a_node_waiting_its_turn_while_replies_keep_arriving_is_not_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(delivery, "OVERDUE_MIN_SECONDS", 0.15)
    # Round 1: every node answers at once. Round 2: a queue (two actors, many boards): node k
    # answers 0.05 k s after the push, node 6 at twice its deadline, yet one after another.
    rounds = {"now": 1}
    grid = FleetGrid(lambda node, copy: (0.0 if rounds["now"] == 1 else 0.05 * node, float(node)))
    events: list[str] = []
    channel = Delivery(grid, 0.01, lambda kind, **f: events.append(kind))
    channel.send_and_receive(_messages(1, 2, 3, 4, 5, 6), 5)  # type: ignore[arg-type]
    assert channel.deadline(6) == pytest.approx(0.15)
    rounds["now"] = 2
    replies = channel.send_and_receive(_messages(1, 2, 3, 4, 5, 6), 5)  # type: ignore[arg-type]
    assert _values(replies) == {k: float(k) for k in range(1, 7)}
    assert events == [] and len(grid.pushed) == 12  # nothing re-sent


def test_a_node_that_died_is_not_sent_again() -> None:
    dead = Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable")
    grid = FleetGrid(lambda node, copy: (0.0, dead) if node == 2 else (0.0, 1.0))
    replies = Delivery(grid, 0.02).send_and_receive(_messages(1, 2), 5)  # type: ignore[arg-type]
    assert len(replies) == 2 and sum(r.has_error() for r in replies) == 1 and len(grid.pushed) == 2


def test_a_fixed_grid_keeps_its_node_snapshot() -> None:
    fixed = FixedNodesGrid(FleetGrid(lambda node, copy: (0.0, 1.0)), [2])  # type: ignore[arg-type]
    assert list(fixed.get_node_ids()) == [2]
