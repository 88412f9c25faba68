"""The ServerApp's view of the fleet.

Waiting for nodes, boundedly: Flower's sampling waits without limit until enough nodes are
connected; the wrapper waits here (at most ``node-wait-timeout``) and then hands Flower a grid
whose node list is fixed, so that Flower's own loop never waits again.

Noticing replies promptly: Flower 1.41's deployed grid (``HttpGrid``) sleeps 3 s between pulls,
so every phase of every round waited up to 3 s after its last reply had arrived. The run's grid
pulls every 0.25 s, and sends lost or overdue instructions again (server/delivery.py).
"""

from __future__ import annotations

import logging
import time

from flwr.serverapp import Grid

from common.board_text import MAX_BOARD_NAME, board_text
from common.flower_glue import ForwardingGrid
from server.delivery import Delivery, EventSink

log = logging.getLogger(__name__)


class RunStopped(RuntimeError):
    """The run cannot go on (too few nodes or usable updates); the message says what to do."""


def board_names(grid: Grid) -> dict[int, str]:
    """Node id -> the name its SuperNode was registered under (``flwr supernode register
    --name``), for the nodes that have one; a grid that cannot say gives none."""
    try:
        return {int(node.node_id): board_text(node.name, MAX_BOARD_NAME) for node in grid.get_nodes() if node.name}
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


class PromptGrid(ForwardingGrid):
    """The run's grid: replies pulled every ``poll`` seconds, lost or overdue instructions sent
    again (server/delivery.py); everything else goes to ``grid``. With ``nodes``, the node list is
    that snapshot (Flower's strategies only sample from it; the round loop sends)."""

    def __init__(
        self,
        grid: Grid,
        poll: float = REPLY_POLL_SECONDS,
        on_event: EventSink | None = None,
        nodes: list[int] | None = None,
    ) -> None:
        self.delivery = Delivery(grid, poll, on_event)
        super().__init__(grid, self.delivery.send_and_receive, nodes)


class FixedNodesGrid(PromptGrid):
    """A grid whose node list is a snapshot."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        super().__init__(grid, nodes=nodes)
