"""Waiting for nodes, boundedly. Flower's sampling waits without limit until enough nodes are
connected; the wrapper waits here (at most ``node-wait-timeout``) and then hands Flower a grid
whose node list is fixed, so that Flower's own loop never waits again."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

if TYPE_CHECKING:
    from flwr.supercore.run import Run  # the type Flower 1.41's Grid declares

log = logging.getLogger(__name__)


class RunStopped(RuntimeError):
    """The run cannot go on (too few nodes or usable updates); the message says what to do."""


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


class FixedNodesGrid(Grid):
    """A grid whose node list is a snapshot; everything else goes to the real grid."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

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
        return self._grid.send_and_receive(messages, timeout=timeout)
