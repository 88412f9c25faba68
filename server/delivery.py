"""One phase's messages out, one reply per node back, within the round.

Flower's grid pushes messages and pulls replies, and a reply can be lost on the way: a reply whose
objects did not all reach the SuperLink comes back as "message unavailable", and under load a
board's push can fail with no reply ever coming. Waiting for ``round-timeout`` then costs the whole
round. So a node's instruction is sent again, a bounded number of times, when its reply is
reported lost, or when it is overdue by that node's own deadline: a few times its slowest reply so
far, so that a slow board is waited for and a lost message is not. The deadline counts from the
later of the node's last send and the exchange's last reply: while replies keep arriving the
federation is working through a queue (two ClientApp actors serving a thousand simulated boards,
a loaded SuperLink), and a board waiting its turn is late, not lost. Training is idempotent (the
same head, seed and cached embeddings give the same update), so whichever copy's reply comes
first is the node's reply; a later one is dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from common.flower_glue import LOST_REPLY_CODES, answer_to
from common.kinds import EventKind
from common.protocol import SERVER_ROUND

OVERDUE_FACTOR = 3.0  # a node's deadline: this many times its slowest reply so far ...
OVERDUE_MIN_SECONDS = 30.0  # ... and never less than this (a ClientApp process starts per message)
MAX_RESENDS = 2

EventSink = Callable[..., None]  # RunLog.event's signature: (kind, **fields)


@dataclass
class _Pending:
    """A node's instruction still waiting for its reply, and the ids of every copy sent."""

    message: Message
    first_sent: float
    last_sent: float
    ids: list[str] = field(default_factory=list)
    resends: int = 0


class Delivery:
    """Sends and collects through ``grid``, pulling every ``poll`` seconds and re-sending lost or
    overdue instructions; remembers each node's slowest reply across rounds."""

    def __init__(self, grid: Grid, poll: float, on_event: EventSink | None = None) -> None:
        self.grid, self.poll = grid, poll
        self.on_event: EventSink = on_event or (lambda kind, **fields: None)
        self.slowest: dict[int, float] = {}  # node -> its slowest reply so far, in seconds

    def deadline(self, node: int) -> float | None:
        """Seconds after which this node's reply is overdue (None: no history yet, wait the round)."""
        slowest = self.slowest.get(node)
        return None if slowest is None else max(OVERDUE_MIN_SECONDS, OVERDUE_FACTOR * slowest)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None) -> list[Message]:
        """Push, then pull until every node has its reply or ``timeout`` (seconds) has passed."""
        messages = list(messages)
        started = time.monotonic()
        pending: dict[int, _Pending] = {}
        node_of: dict[str, int] = {}  # every copy's message id -> its node
        for message, message_id in zip(messages, self.grid.push_messages(messages), strict=True):
            node = message.metadata.dst_node_id
            pending[node] = _Pending(message, started, started, [message_id])
            node_of[message_id] = node
        end = None if timeout is None else started + timeout
        replies: list[Message] = []
        progress = started  # when the last reply of this exchange arrived
        while pending:
            for reply in self.grid.pull_messages(list(node_of)):
                node = node_of.pop(reply.metadata.reply_to_message_id, -1)
                if node in pending:
                    self._arrived(reply, node, pending, node_of, replies)
                    progress = time.monotonic()
            now = time.monotonic()
            if not pending or (end is not None and now >= end):
                break
            for node, item in list(pending.items()):
                limit = self.deadline(node)
                waited = now - max(item.last_sent, progress)
                if limit is not None and item.resends < MAX_RESENDS and waited >= limit:
                    self._resend(node, item, node_of, f"no reply within {limit:.0f}s ({OVERDUE_FACTOR:g}x its slowest)")
            time.sleep(self.poll)
        return replies

    def _arrived(
        self, reply: Message, node: int, pending: dict[int, _Pending], node_of: dict[str, int], replies: list[Message]
    ) -> None:
        item = pending[node]
        if reply.has_error() and reply.error.code in LOST_REPLY_CODES and item.resends < MAX_RESENDS:
            self._resend(node, item, node_of, f"reply lost: {reply.error.reason}")
            return
        del pending[node]
        for other in item.ids:  # a later copy's reply is not waited for
            node_of.pop(other, None)
        if not reply.has_error():
            self.slowest[node] = max(self.slowest.get(node, 0.0), time.monotonic() - item.last_sent)
        if item.resends:
            self.on_event(
                EventKind.REPLY_RECOVERED,
                round=_round(item.message),
                node=node,
                resends=item.resends,
                error=reply.has_error(),
            )
        # The reply answers the node's instruction, whichever copy it came through: screening
        # matches replies to nodes by the first message's id (as Flower itself sets ids on push).
        answer_to(reply, item.ids[0])
        replies.append(reply)

    def _resend(self, node: int, item: _Pending, node_of: dict[str, int], reason: str) -> None:
        original = item.message
        copy = Message(
            original.content,
            node,
            original.metadata.message_type,
            group_id=original.metadata.group_id,
        )
        (message_id,) = self.grid.push_messages([copy])
        node_of[message_id] = node
        item.ids.append(message_id)
        item.resends += 1
        item.last_sent = time.monotonic()
        self.on_event(
            EventKind.MESSAGE_RESENT,
            round=_round(original),
            phase=original.metadata.message_type.split(".")[0],
            node=node,
            attempt=item.resends + 1,
            reason=reason,
        )


def _round(message: Message) -> int | None:
    """The round a message belongs to: Flower's strategies put it in every config record (and the
    legacy workflows in the group id); a query before round 1 has neither."""
    for record in message.content.config_records.values():
        server_round = record.get(SERVER_ROUND)
        if isinstance(server_round, int):
            return server_round
    group = message.metadata.group_id
    return int(group) if group.isdigit() else None
