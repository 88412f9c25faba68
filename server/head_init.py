"""One-shot head initialisations before round 1: FedNCM (the classifier from the federation's
class means), Fed3R (the federation's ridge classifier, common/fed3r.py) and, from Fed3R's
same statistics, the federation's shrinkage LDA classifier.

Each is one query to every connected node for its statistics under the initial model (embedding
its images on the way, as round 1 would); nodes that fail or send malformed statistics are left
out (screened like any reply, the reason in the events); with none usable the head stays random.
Their class counts become the run's class prior (class-balance)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import protocol
from common.balance import class_prior, posthoc_offsets
from common.config import RunConfig
from common.fed3r import add_stats, calibrated_temperature, ridge_head_arrays, ridge_scores, solve_lda, solve_ridge
from common.flower_glue import to_array_record
from common.kinds import ClassBalance, HeadInit, HeadKind
from common.numpy_head import layer_names, log_softmax, ncm_head_arrays
from common.protocol import Phase, RidgeStats
from server.edgesplit_strategy import EdgeSplitStrategy
from server.ledger import RoundRecord
from server.screening import class_counts_of, class_stats_of, ridge_stats_of
from server.server_run import ServerRun

log = logging.getLogger(__name__)


def _ask_all(
    strategy: EdgeSplitStrategy, run: ServerRun, grid: Grid, head: dict[str, np.ndarray], phase: Phase
) -> list[Message]:
    """Send the one-shot query, with the run's instructions, to every connected node; the screened
    replies (counted in the initialisation's tally: bytes both ways, backbones sent)."""
    strategy.tally.begin(0)
    question = ConfigRecord({**run.instructions(0, phase).to_record(), protocol.ACTION: phase.value})
    arrays = to_array_record(head)
    messages = [
        Message(
            RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: question}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in strategy.connected(grid)
    ]
    prepared = strategy.prepare(phase, messages, grid)
    replies = grid.send_and_receive(prepared, timeout=run.config.round_timeout)
    return strategy.screened(phase, replies).accepted


def _record(run: ServerRun, record: RoundRecord, started: float, **facts: Any) -> None:
    """What the initialisation found, and what its query cost (its tally's ``record``)."""
    run.record_initialisation(
        **facts,
        bytes_down=record.bytes_down,
        bytes_up=record.bytes_up,
        backbones_sent=record.backbones_sent,
        seconds=round(time.perf_counter() - started, 3),
    )


def fedncm_head(
    strategy: EdgeSplitStrategy, run: ServerRun, grid: Grid, head: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The initial head with its classifier set from the nodes' class sums (``head`` if none came)."""
    started = time.perf_counter()
    accepted = _ask_all(strategy, run, grid, head, Phase.CLASS_SUMS)
    stats = [class_stats_of(reply) for reply in accepted]
    counts, known = np.zeros(len(run.classes)), list[int]()
    if stats:
        counts = np.sum([s.counts for s in stats], axis=0)
        head, known = ncm_head_arrays(head, np.sum([s.sums for s in stats], axis=0), counts)
    else:
        log.warning("FedNCM: no usable class statistics arrived; the head starts random")
    _record(
        run,
        strategy.tally.record,
        started,
        method=HeadInit.NCM,
        nodes=len(accepted),
        classes_set=known,
        class_counts=counts.astype(int).tolist(),
    )
    return head


def federated_class_counts(
    strategy: EdgeSplitStrategy, run: ServerRun, grid: Grid, head: dict[str, np.ndarray]
) -> None:
    """Class balance without FedNCM's or Fed3R's statistics: one counts-only query (labels only,
    no image embedded) gives the run its class prior."""
    started = time.perf_counter()
    accepted = _ask_all(strategy, run, grid, head, Phase.CLASS_COUNTS)
    counts = np.sum([class_counts_of(reply) for reply in accepted], axis=0) if accepted else None
    if counts is None:
        log.warning("class balance: no usable class counts arrived; training is not balanced")
        counts = np.zeros(len(run.classes))
    _record(
        run,
        strategy.tally.record,
        started,
        method=HeadInit.RANDOM,
        nodes=len(accepted),
        class_counts=counts.astype(int).tolist(),
    )


def fed3r_head(
    strategy: EdgeSplitStrategy, run: ServerRun, grid: Grid, head: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The initial head with its last layer set to the classifier solved from the nodes' Fed3R
    statistics (``head`` if none came). ``head-init='fed3r'``: the ridge classifier, its
    temperature calibrated on the server's held-out split; ``'lda'``: the shrinkage LDA classifier,
    whose scores are log-posteriors already (no held-out data used). With class-balance, the bias
    is adjusted by the federation's class prior."""
    started = time.perf_counter()
    method = run.config.head_init
    accepted = _ask_all(strategy, run, grid, head, Phase.RIDGE_SUMS)
    if not accepted:
        log.warning("%s: no usable ridge statistics arrived; the head starts random", method)
        no_classes = [0] * len(run.classes)
        _record(run, strategy.tally.record, started, method=method, nodes=0, classes_set=[], class_counts=no_classes)
        return head
    # in an order of their content, not of their arrival: the same replies give the same head
    replies = sorted(
        (ridge_stats_of(reply) for reply in accepted), key=lambda r: r.counts.tobytes() + r.gram[:64].tobytes()
    )
    stats = add_stats(replies)
    settings = ClosedFormSettings.from_config(run.config)
    last_inputs = run.trainable(head).last_inputs
    head, solved = closed_form_head(settings, method, head, stats, last_inputs, run.test.features, run.test.labels)
    counts = stats.counts.astype(int)
    _record(
        run,
        strategy.tally.record,
        started,
        method=method,
        nodes=len(accepted),
        classes_set=[c for c in range(len(counts)) if counts[c] > 0],
        class_counts=counts.tolist(),
        **solved,
    )
    return head


@dataclass(frozen=True)
class ClosedFormSettings:
    """The run-config keys a closed-form head is solved with (``closed_form_head``)."""

    head: HeadKind  # which of its layers is the last
    fed3r_lambda: float
    lda_shrinkage: float
    class_balance: ClassBalance
    logit_adjust_tau: float
    average_views: bool  # the held-out calibration scores the views' mean, as the server does

    @classmethod
    def from_config(cls, config: RunConfig) -> ClosedFormSettings:
        return cls(
            head=config.head,
            fed3r_lambda=config.fed3r_lambda,
            lda_shrinkage=config.lda_shrinkage,
            class_balance=config.class_balance,
            logit_adjust_tau=config.logit_adjust_tau,
            average_views=config.average_views,
        )


def closed_form_head(
    settings: ClosedFormSettings,
    method: HeadInit,
    head: dict[str, np.ndarray],
    stats: RidgeStats,
    last_inputs: Callable[[np.ndarray], np.ndarray],
    held_out_features: np.ndarray,
    held_out_labels: np.ndarray,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``head`` with its last layer solved from the federation's summed Fed3R statistics by
    ``method`` ('fed3r': ridge, its temperature calibrated on the held-out features the last
    layer's inputs ``last_inputs`` map; 'lda': shrinkage LDA, no temperature), its bias adjusted
    by the statistics' class prior under the settings' class balance; and what was solved with."""
    if method == HeadInit.LDA:
        weight, bias = solve_lda(stats, settings.lda_shrinkage)
        temperature, solved = 1.0, {"shrinkage": settings.lda_shrinkage}
    else:
        weight, bias = solve_ridge(stats, settings.fed3r_lambda)
        scores = ridge_scores(last_inputs, held_out_features, weight, bias)
        nll = lambda t: heldout_nll(scores, held_out_labels, t, settings.average_views)  # noqa: E731
        temperature, solved = calibrated_temperature(nll), {"penalty": settings.fed3r_lambda}
    offsets = posthoc_offsets(settings.class_balance, class_prior(stats.counts), settings.logit_adjust_tau)
    arrays = ridge_head_arrays(head, layer_names(settings.head)[-1], weight, bias, temperature, offsets)
    return arrays, {"temperature": round(temperature, 4), **solved, "adjusted": offsets is not None}


def heldout_nll(scores: np.ndarray, labels: np.ndarray, temperature: float, average_views: bool) -> float:
    """Mean negative log-likelihood of (n, views, classes) ridge scores as logits x ``temperature``,
    the probabilities averaged over the views as the server scores them."""
    chosen = scores if average_views else scores[:, :1]
    probabilities = np.exp(log_softmax(temperature * chosen.reshape(-1, chosen.shape[-1])))
    mean = probabilities.reshape(chosen.shape).mean(1)
    picked = mean[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]
    return float(-np.log(np.maximum(picked, 1e-12)).mean())
