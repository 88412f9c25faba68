"""The ServerApp's grid notices replies within a fraction of a second and bounds its wait."""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

from server.nodes import FixedNodesGrid, PromptGrid


class SlowRepliesGrid:
    """Replies that arrive ``delay`` seconds after the push, except for the ids in ``lost``."""

    def __init__(self, delay: float, lost: frozenset[str] = frozenset()) -> None:
        self.delay, self.lost, self.pulls = delay, lost, 0
        self.pushed_at = 0.0

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        self.pushed_at = time.monotonic()
        return [m.id for m in messages]

    def pull_messages(self, ids: Iterable[str]) -> list[Any]:
        self.pulls += 1
        if time.monotonic() - self.pushed_at < self.delay:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids if i not in self.lost]

    def send_and_receive(self, *args: Any, **kwargs: Any) -> list[Any]:
        raise AssertionError("the wrapper pulls itself; Flower's HTTP grid would sleep 3 s between pulls")


def _messages(*ids: str) -> list[Any]:
    return [SimpleNamespace(id=i) for i in ids]


def test_replies_are_noticed_within_one_poll_of_arriving() -> None:
    grid = SlowRepliesGrid(delay=0.3)
    started = time.monotonic()
    replies = list(PromptGrid(grid, poll=0.05).send_and_receive(_messages("a", "b"), timeout=10))  # type: ignore[arg-type]
    waited = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert 0.3 <= waited < 1.0 and grid.pulls >= 3


def test_a_lost_reply_bounds_the_wait_by_the_timeout_and_the_others_are_kept() -> None:
    grid = SlowRepliesGrid(delay=0.0, lost=frozenset({"b"}))
    started = time.monotonic()
    replies = list(PromptGrid(grid, poll=0.05).send_and_receive(_messages("a", "b"), timeout=0.4))  # type: ignore[arg-type]
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.4 <= time.monotonic() - started < 1.5


def test_a_fixed_grid_keeps_its_node_snapshot_and_pulls_promptly() -> None:
    grid = SlowRepliesGrid(delay=0.0)
    fixed = FixedNodesGrid(grid, [2])  # type: ignore[arg-type]
    assert list(fixed.get_node_ids()) == [2]
    assert len(list(fixed.send_and_receive(_messages("a"), timeout=1))) == 1  # type: ignore[arg-type]
