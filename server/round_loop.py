"""The round loop: the same few calls as Flower's ``Strategy.start()``, plus what ``start()``
cannot do: begin at a checkpointed round, retry a round that got too few usable updates,
checkpoint after every round, and stop with a clear message instead of waiting forever."""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
from flwr.serverapp import Grid

from common.config import RunConfig, check_simulated_split
from common.data import DataError
from common.flower_glue import (
    from_array_record,
    restore_strategy_state,
    strategy_state,
    to_array_record,
    to_config_record,
)
from common.kinds import FROM_RIDGE_SUMS, ClassBalance, DatasetKind, EventKind, HeadInit
from common.protocol import Phase
from server.checkpoint import Checkpoint, random_state_from_json, random_state_to_json
from server.edgesplit_strategy import EdgeSplitStrategy
from server.head_init import fed3r_head, federated_class_counts, fedncm_head
from server.nodes import RunStopped
from server.secure_rounds import train_secure
from server.server_run import ServerRun

log = logging.getLogger(__name__)


class RoundLoop:
    """Runs a strategy's rounds for one ``ServerRun``; ``global_head`` is the latest global head,
    whatever happens next (a stopped run still writes it)."""

    def __init__(self, strategy: EdgeSplitStrategy, run: ServerRun) -> None:
        self.strategy, self.run = strategy, run
        self.global_head = self.run.start_head

    def run_rounds(self, grid: Grid) -> dict[str, np.ndarray]:
        """Rounds after the checkpointed one (if any) up to ``num-server-rounds``; returns the
        final head. Raises RunStopped when too few nodes connect or a round fails too often."""
        config = self.run.config
        check_start(config, len(self.strategy.connected(grid)))
        self.strategy.meet(grid)
        if self.run.checkpoint is not None:
            restore_strategy_state(self.strategy.inner, self.run.checkpoint.strategy_state)
            if self.run.checkpoint.random_state is not None:
                random.setstate(random_state_from_json(self.run.checkpoint.random_state))
        else:
            random.seed(config.seed)  # Flower samples nodes with Python's global RNG
            if config.head_init == HeadInit.NCM:
                self.global_head = fedncm_head(self.strategy, self.run, grid, self.global_head)
            elif config.head_init in FROM_RIDGE_SUMS:
                self.global_head = fed3r_head(self.strategy, self.run, grid, self.global_head)
            elif config.class_balance != ClassBalance.NONE or config.local_prior_correction:
                federated_class_counts(self.strategy, self.run, grid, self.global_head)
            report = self.run.evaluate(self.global_head)
            self.run.run_log.event(
                EventKind.INITIAL_EVALUATION,
                accuracy=report.accuracy,
                macro_f1=report.macro_f1,
                balanced_accuracy=report.balanced_accuracy,
                per_class_recall=report.per_class_recall,
                loss=report.loss,
            )
            if config.num_server_rounds == 0:  # the initial head is the run's result (e.g. Fed3R alone)
                self.run.final_report = report
        for server_round in range(self.run.start_round + 1, config.num_server_rounds + 1):
            self.global_head = self._train(server_round, grid)
            if config.fraction_evaluate > 0:
                self._evaluate(server_round, grid)
            self._end_round(server_round)
        return self.global_head

    def _train(self, server_round: int, grid: Grid) -> dict[str, np.ndarray]:
        """One round's training, retried while it gets fewer than min-clients usable updates."""
        config, strategy = self.run.config, self.strategy
        strategy.tally.begin(server_round)
        instructions = to_config_record(self.run.instructions(server_round, Phase.TRAIN))
        for attempt in range(config.round_retries + 1):
            strategy.tally.record.attempts = attempt + 1
            head = to_array_record(self.global_head)
            if strategy.secure is not None:
                aggregated = train_secure(strategy, server_round, head, instructions, grid)
            else:
                messages = strategy.configure_train(server_round, head, instructions, grid)
                replies = grid.send_and_receive(messages, timeout=config.round_timeout)
                aggregated, _ = strategy.aggregate_train(server_round, replies)
            if aggregated is not None:
                return from_array_record(aggregated)
            if attempt < config.round_retries:
                self.run.run_log.event(EventKind.ROUND_RETRY, round=server_round, attempt=attempt + 2)
                log.warning(
                    "round %d: retrying (attempt %d of %d)", server_round, attempt + 2, 1 + config.round_retries
                )
        raise RunStopped(
            f"Round {server_round} got fewer than min-clients={config.min_clients} usable updates in "
            f"{config.round_retries + 1} attempts; the run stops at round {server_round - 1}. The reasons "
            "are in events.jsonl and on the dashboard (failed and rejected clients). Fix them, then "
            f"continue with resume-from='{self.run.run_log.run_dir}'."
        )

    def _evaluate(self, server_round: int, grid: Grid) -> None:
        config, strategy = self.run.config, self.strategy
        instructions = to_config_record(self.run.instructions(server_round, Phase.EVALUATE))
        messages = strategy.configure_evaluate(server_round, to_array_record(self.global_head), instructions, grid)
        strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=config.round_timeout))

    def _end_round(self, server_round: int) -> None:
        """Central evaluation and the round's record, then the checkpoint: after the round-end
        event, so that a crash between the two redoes this round on resume (the event log
        shows both attempts; readers keep the last)."""
        report = self.run.evaluate(self.global_head)
        self.run.record_round(self.strategy.tally.close(), report)
        run = self.run
        Checkpoint(
            round=server_round,
            head=self.global_head,
            fingerprint=run.fingerprint,
            classes=run.classes,
            strategy=run.config.strategy,
            strategy_state=strategy_state(self.strategy.inner),
            random_state=random_state_to_json(random.getstate()),
            rounds=[asdict(r) for r in run.rounds],
            dp_releases=list(run.dp_releases),
            totals={**run.embedding.totals(), "class_counts": list(run.class_counts)},
        ).save(run.run_log.run_dir)
        run.run_log.event(EventKind.CHECKPOINT, round=server_round)


def check_start(config: RunConfig, num_nodes: int) -> None:
    """What the server can know before round 1 about how the nodes will find their data, checked
    once (RunStopped) rather than found by every node in every round: whether ELPV splits over
    the connected nodes as configured, and whether enough nodes of a simulated folder dataset have
    their folder to reach min-clients."""
    try:
        if config.dataset == DatasetKind.ELPV:
            check_simulated_split(config, num_nodes)
        elif config.data_dir:
            root = Path(config.data_dir).expanduser()
            missing = [f"client-{i}" for i in range(num_nodes) if not (root / f"client-{i}").is_dir()]
            problem = (
                f"run-config 'data-dir' {str(root)!r} has no folder for {len(missing)} of the {num_nodes} "
                f"simulated clients ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): make "
                "one ImageFolder client-<partition-id>/ per client, or run fewer clients (num-supernodes)"
            )
            if num_nodes - len(missing) < config.min_clients:
                raise DataError(f"{problem}; fewer than min-clients={config.min_clients} are left.")
            if missing:  # the others can run: those nodes say so themselves, once each
                log.warning("%s.", problem)
    except DataError as error:
        raise RunStopped(f"The nodes cannot find their data as configured: {error}") from None
