"""The edgesplit strategy: a wrapper around any Flower strategy (by composition, as Flower's DP
wrappers are), which federates the trainable part (the head, and the backbone's tail at a later
cut). The inner Flower strategy samples and aggregates; around it, collaborators each own one
job:

- ``server/nodes.py``: waiting for nodes, boundedly;
- ``server/distribution.py``: the backbone, once per node;
- ``server/screening.py``: every reply, before the inner strategy sees it;
- ``server/dp.py`` (DP runs): the released head, from what the inner strategy aggregated;
- ``server/ledger.py``: the round's record and the embedding counts.

``EdgeSplitStrategy.for_run`` builds them from a ``ServerRun``; the strategy itself keeps no run.

The round loop (retries, checkpoints, central evaluation) is ``server/round_loop.py``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import protocol
from common.flower_glue import from_array_record, to_array_record
from common.kinds import FROM_RIDGE_SUMS, EventKind
from common.protocol import ClassCounts, Phase
from server.aggregation import make_inner_strategy
from server.distribution import BackboneDistributor
from server.dp import DpSettings, PrivateRelease
from server.ledger import RoundTally
from server.nodes import FixedNodesGrid, RunStopped, board_names, wait_for_nodes
from server.run_folder import RunLog
from server.screening import ExpectedReplies, ReplyScreen, Screened, ScreeningBounds
from server.secure_sum import SecureSettings
from server.server_run import ServerRun
from server.validation import number

log = logging.getLogger(__name__)


def content_digest(reply: Message) -> bytes:
    """A hash of a reply's arrays, names and bytes: an order of replies that arrival cannot change."""
    digest = hashlib.sha256()
    for name, array in sorted(reply.content.array_records[protocol.ARRAYS].items()):
        digest.update(name.encode() + array.data)
    return digest.digest()


class EdgeSplitStrategy(Strategy):
    """Split federation around the Flower strategy ``inner``."""

    def __init__(
        self,
        inner: Strategy,
        *,
        run_log: RunLog,
        min_clients: int,
        node_wait_timeout: float,
        distributor: BackboneDistributor,
        screen: ReplyScreen,
        privacy: PrivateRelease | None = None,
        secure: SecureSettings | None = None,
    ) -> None:
        self.inner, self.run_log = inner, run_log
        self.secure = secure  # with secure sums (server/secure_sum.py): how they are taken
        self.min_clients, self.node_wait_timeout = min_clients, node_wait_timeout
        self.distributor, self.screen, self.privacy = distributor, screen, privacy
        self.tally = RoundTally()
        self._sent: dict[Phase, list[tuple[Message, int]]] = {}  # what each phase sent this round
        self.start_head: dict[str, np.ndarray] | None = None  # the head this round's updates start from
        self._connected: list[int] = []  # the nodes connected when a phase was last configured

    @classmethod
    def for_run(cls, run: ServerRun, inner: Strategy | None = None) -> EdgeSplitStrategy:
        """The strategy and its collaborators for ``run``, around ``inner`` (by default the Flower
        strategy the run config names)."""
        config = run.config
        expected = ExpectedReplies(
            fingerprint=run.fingerprint,
            head_shapes=run.head_shapes(),
            class_stats_shapes=run.class_stats_shapes(),
            ridge_stats_shapes=run.ridge_stats_shapes(),
            ridge_feature_bound=run.ridge_feature_bound() if config.head_init in FROM_RIDGE_SUMS else 0.0,
            class_counts_shapes=ClassCounts.shapes(len(run.classes)),
            personal_scores=config.personal_epochs > 0,
        )
        screen = ReplyScreen(
            bounds=ScreeningBounds.from_config(config),
            expected=expected,
            run_log=run.run_log,
            embedding=run.embedding,
            nodes=run.nodes,
        )
        privacy = None
        if config.dp:
            settings = DpSettings(config.dp_clipping_norm, config.dp_noise_multiplier, config.dp_delta)
            # the run's releases so far (a resumed run's checkpointed ones too): the budget counts them
            privacy = PrivateRelease(settings, run.run_log, run.dp_releases)
        return cls(
            make_inner_strategy(config) if inner is None else inner,
            run_log=run.run_log,
            min_clients=config.min_clients,
            node_wait_timeout=config.node_wait_timeout,
            distributor=BackboneDistributor(run.run_log, run.variants, run.engine, config.round_timeout),
            screen=screen,
            privacy=privacy,
            secure=SecureSettings(config.secure_shares, config.seed, config.round_timeout, config.secure_group_size)
            if config.secure_sums
            else None,
        )

    def summary(self) -> None:
        self.inner.summary()

    # --- the steps the round loop (server/round_loop.py) and FedNCM's query take --------------------

    def connected(self, grid: Grid) -> list[int]:
        """The connected nodes, once at least min-clients are (waiting at most node-wait-timeout)."""
        nodes = wait_for_nodes(grid, self.min_clients, self.node_wait_timeout, self.min_clients)
        self.run_log.board_names.update(board_names(grid))
        self._connected = nodes
        return nodes

    def meet(self, grid: Grid) -> None:
        """Before round 1: ask every connected node which engine it runs and which backbone variant
        it holds (one small query each), so that round 1 is a round like the others rather than
        one that waits for an extra exchange with every board."""
        started = time.perf_counter()
        self.tally.begin(0)
        nodes = [node for node in self.connected(grid) if not self.distributor.knows(node)]
        answered = self.distributor.ask_status(nodes, grid, self.tally) if nodes else 0
        self.run_log.event(
            EventKind.NODES_MET, asked=len(nodes), answered=answered, seconds=round(time.perf_counter() - started, 3)
        )

    def check_setup_errors(self) -> None:
        """Stop the run if fewer than min-clients of the connected nodes can take part as configured:
        their data or node config fails the same way on every retry."""
        errors = {node: reason for node, reason in self.screen.setup_errors.items() if node in self._connected}
        able, minimum = len(self._connected) - len(errors), self.min_clients
        if not errors or able >= minimum:
            return
        by_reason: dict[str, list[int]] = {}
        for node, reason in sorted(errors.items()):
            by_reason.setdefault(reason, []).append(node)
        reasons = "\n".join(
            f"- {len(nodes)} node(s) ({', '.join(self.run_log.board_names.get(n, str(n)) for n in nodes[:5])}"
            f"{', ...' if len(nodes) > 5 else ''}): {reason}"
            for reason, nodes in by_reason.items()
        )
        raise RunStopped(
            f"{len(errors)} of {len(self._connected)} connected node(s) cannot take part as configured, leaving "
            f"{able}, fewer than min-clients={minimum}; a retry would fail the same way. Fix this and start "
            f"the run again:\n{reasons}"
        )

    def prepare(self, phase: Phase, messages: Iterable[Message], grid: Grid) -> list[Message]:
        """The messages with each node's engine, variant and (where it lacks it) backbone."""
        prepared = self.distributor.prepare(list(messages), grid, self.tally)
        self._sent[phase] = prepared
        return [message for message, _ in prepared]

    def screened(self, phase: Phase, replies: Iterable[Message]) -> Screened:
        """The replies that may be used; nodes that failed must be asked for their backbone again."""
        start = self.start_head if phase is Phase.TRAIN else None
        result = self.screen.screen(phase, self._sent.pop(phase, []), list(replies), self.tally, start)
        self.distributor.forget(result.lost)
        return result

    # --- Flower's strategy interface ------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.tally.begin(server_round)
        self.start_head = from_array_record(arrays)
        nodes = FixedNodesGrid(grid, self.connected(grid))
        return self.prepare(Phase.TRAIN, self.inner.configure_train(server_round, arrays, config, nodes), grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        sampled = len(self._sent.get(Phase.TRAIN, []))  # the nodes this attempt asked, before any reply
        accepted = self.screened(Phase.TRAIN, replies).accepted
        self.tally.record.clients_ok = len(accepted)
        minimum = self.min_clients
        if len(accepted) < minimum:
            self.check_setup_errors()
            # Too few answered in time (failed, rejected or past the deadline): an average over
            # fewer than the operator's minimum is not trusted; the global head stays as it was.
            log.warning(
                "round %d: %d usable update(s), fewer than min-clients=%d; keeping the previous head",
                server_round,
                len(accepted),
                minimum,
            )
            self.run_log.event(EventKind.ROUND_SKIPPED, round=server_round, usable=len(accepted), minimum=minimum)
            return None, None
        # In an order of their content, not of their arrival: float sums depend on the order, and the
        # same updates must give the same head (a re-run, a resumed run, the export check's cache).
        ordered = sorted(accepted, key=content_digest)
        if self.privacy is None:
            return self.inner.aggregate_train(server_round, ordered)
        return self._private_release(self.privacy, server_round, ordered, sampled)

    def _private_release(
        self, privacy: PrivateRelease, server_round: int, accepted: list[Message], sampled: int
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """DP (server/dp.py): the inner strategy averages the updates ``privacy`` clipped, and
        ``privacy`` releases the round's head from that average."""
        start = self.start_head
        assert start is not None  # configure_train set it
        for reply in accepted:
            arrays = from_array_record(reply.content.array_records[protocol.ARRAYS])
            reply.content.array_records[protocol.ARRAYS] = to_array_record(privacy.clipped(arrays, start))
        aggregated, metrics = self.inner.aggregate_train(server_round, accepted)
        if aggregated is None:
            return None, metrics
        mean = from_array_record(aggregated)
        head = privacy.released(server_round, start, mean, len(accepted), sampled, self.tally.record)
        return to_array_record(head), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = FixedNodesGrid(grid, self.connected(grid))
        return self.prepare(Phase.EVALUATE, self.inner.configure_evaluate(server_round, arrays, config, nodes), grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        accepted = self.screened(Phase.EVALUATE, replies).accepted
        # A client without a local test share has nothing to weigh in with.
        scored = [m for m in accepted if number(m.content[protocol.METRICS].get(protocol.NUM_EXAMPLES)) > 0]
        metrics = self.inner.aggregate_evaluate(server_round, scored) if scored else None
        if metrics is not None and protocol.ACCURACY in metrics:
            self.tally.record.client_accuracy = number(metrics[protocol.ACCURACY])
        if metrics is not None and protocol.PERSONAL_ACCURACY in metrics:
            self.tally.record.client_personal_accuracy = number(metrics[protocol.PERSONAL_ACCURACY])
        return metrics
