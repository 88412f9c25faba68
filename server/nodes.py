"""The ServerApp's view of the fleet.

Waiting for nodes, boundedly: Flower's sampling waits without limit until enough nodes are
connected; the wrapper waits here (at most ``node-wait-timeout``) and then hands Flower a grid
whose node list is fixed, so that Flower's own loop never waits again.

Noticing replies promptly: Flower 1.41's deployed grid (``HttpGrid``) sleeps 3 s between pulls,
so every phase of every round waited up to 3 s after its last reply had arrived.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

if TYPE_CHECKING:
    from flwr.proto.node_pb2 import NodeInfo
    from flwr.supercore.run import Run  # the type Flower 1.41's Grid declares

log = logging.getLogger(__name__)


class RunStopped(RuntimeError):
    """The run cannot go on (too few nodes or usable updates); the message says what to do."""


def board_names(grid: Grid) -> dict[int, str]:
    """Node id -> the name its SuperNode was registered under (``flwr supernode register
    --name``), for the nodes that have one; a grid that cannot say gives none."""
    try:
        return {int(node.node_id): str(node.name) for node in grid.get_nodes() if node.name}
    except Exception as error:  # names are a courtesy: never a reason to stop a run
        log.warning("could not read the SuperNodes' names: %s", error)
        return {}


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, min_clients: int) -> list[int]:
    """The connected nodes, once at least ``minimum`` are; RunStopped after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise RunStopped(
                f"Only {len(nodes)} node(s) connected within node-wait-timeout={timeout:g}s; this run needs "
                f"min-clients={min_clients}. Start more SuperNodes (README: Deploy on real devices), check that "
                "they reach the SuperLink, or lower min-clients."
            )
        log.info("waiting for nodes: %d connected, %d needed", len(nodes), minimum)
        time.sleep(1.0)
    return nodes


# Between pulls for replies: one small request to the SuperLink each (the simulation's grid uses 0.1 s).
REPLY_POLL_SECONDS = 0.25


class PromptGrid(Grid):
    """The run's grid, pulling replies every ``poll`` seconds; everything else goes to ``grid``."""

    def __init__(self, grid: Grid, poll: float = REPLY_POLL_SECONDS) -> None:
        self._grid, self._poll = grid, poll

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every message has its reply or ``timeout`` (seconds) has passed."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            arrived = list(self.pull_messages(waiting))
            replies += arrived
            waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._poll)
        return replies


class FixedNodesGrid(PromptGrid):
    """A grid whose node list is a snapshot."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        super().__init__(grid)
        self._nodes = list(nodes)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [node for node in self._grid.get_nodes() if node.node_id in self._nodes]
