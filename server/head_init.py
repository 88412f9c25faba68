"""One-shot head initialisations before round 1: FedNCM (the classifier from the federation's
class means), Fed3R (the federation's ridge classifier, common/fed3r.py) and, from Fed3R's
same statistics, the federation's shrinkage LDA classifier.

Each is one query to every connected node for its statistics under the initial model (embedding
its images on the way, as round 1 would); nodes that fail or send malformed statistics are left
out (screened like any reply, the reason in the events); with none usable the head stays random.
Their class counts become the run's class prior (class-balance)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import protocol, secure_sum
from common.balance import class_prior, posthoc_offsets
from common.config import RunConfig
from common.fed3r import calibrated_temperature, ridge_head_arrays, ridge_scores, solve_lda, solve_ridge
from common.flower_glue import from_array_record, to_array_record
from common.kinds import ClassBalance, HeadInit, HeadKind
from common.numpy_head import layer_names, log_softmax, ncm_head_arrays
from common.protocol import Phase, RidgeStats
from server.edgesplit_strategy import EdgeSplitStrategy
from server.ledger import RoundRecord
from server.secure_rounds import summed
from server.server_run import ServerRun

log = logging.getLogger(__name__)


@dataclass
class Gathered:
    """The federation's sum of one query's statistics (by array name; None if there is none), the
    boards it sums over, and what the run records of how it was taken."""

    total: dict[str, np.ndarray] | None
    boards: int
    facts: dict[str, Any]


def _gather(
    strategy: EdgeSplitStrategy, run: ServerRun, grid: Grid, head: dict[str, np.ndarray], phase: Phase
) -> Gathered:
    """Send the one-shot query, with the run's instructions, to every connected node, and add up
    their statistics: each screened reply in the clear, or with secure sums only their sum
    (server/secure_sum.py), itself checked (``sum_problem``). Counted in the initialisation's
    tally: bytes both ways, backbones sent."""
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
    if run.config.secure_sums:
        shapes = secure_sum.statistics_part_shapes(run.statistics_shapes(phase))
        result = summed(strategy, phase, messages, grid, shapes)
        facts, total = result.facts(), result.total
        problem = result.reason or (sum_problem(strategy, run, phase, total) if total is not None else None)
        if problem is not None:
            log.warning("%s: no usable secure sum: %s", phase.value, problem)
            return Gathered(None, 0, {**facts, "no_sum": problem})
        assert total is not None
        return Gathered({k: v for k, v in total.items() if k != secure_sum.NUM_EXAMPLES}, result.boards, facts)
    prepared = strategy.prepare(phase, messages, grid)
    replies = grid.send_and_receive(prepared, timeout=run.config.round_timeout)
    accepted = strategy.screened(phase, replies).accepted
    parts = [from_array_record(reply.content.array_records[protocol.STATISTICS_RECORDS[phase]]) for reply in accepted]
    # in an order of their content, not of their arrival: the same replies give the same sum
    parts.sort(key=lambda part: hashlib.sha256(b"".join(part[n].tobytes() for n in sorted(part))).digest())
    total = {name: np.sum([p[name].astype(np.float64) for p in parts], axis=0) for name in parts[0]} if parts else None
    return Gathered(total, len(accepted), {"secure": False})


def sum_problem(strategy: EdgeSplitStrategy, run: ServerRun, phase: Phase, total: dict[str, np.ndarray]) -> str | None:
    """Why a secure sum of statistics cannot be used (no reply of it could be screened, so the sum
    is): whatever the reply screen refuses in one board's statistics of this query (a sum of honest
    parts passes it too: finite, whole counts, Cauchy-Schwarz, the trace bound), counts that are not
    the images the parts say they summed, or fewer images than the Gram floor."""
    statistics = {name: values for name, values in total.items() if name != secure_sum.NUM_EXAMPLES}
    reason = strategy.screen.statistics[phase][1](statistics)
    if reason is not None:
        return f"the sum fails the check of one board's statistics: {reason}"
    counted, images = float(total["counts"].sum()), float(total[secure_sum.NUM_EXAMPLES][0])
    if counted > images + 1e-3 or (phase is not Phase.CLASS_SUMS and abs(counted - images) > 1e-3):
        return f"the statistics count {counted:.0f} images where the boards' parts say {images:.0f}"
    floor = run.config.min_sum_examples or run.ridge_stats_shapes()["sums"][-1]
    if phase is Phase.RIDGE_SUMS and counted < floor:
        return (
            f"the sum covers {counted:.0f} images, fewer than the {floor} below which a Gram matrix is an exact "
            "membership test of its images (README, trust model); more boards or more images are needed"
        )
    return None


def _floored(run: ServerRun, total: dict[str, np.ndarray], secure: bool) -> dict[str, np.ndarray]:
    """With secure sums the per-class floor holds for the federation's total: a class with fewer
    images than ncm-min-examples in the whole sum is left out of the head (its sums and count set
    to zero), as a board leaves it out of a clear reply."""
    if not secure:
        return total
    few = (total["counts"] > 0) & (total["counts"] < run.config.ncm_min_examples)
    if not np.any(few):
        return total
    floored = {**total, "counts": np.where(few, 0.0, total["counts"])}
    floored["sums"] = np.where(few[:, None], 0.0, total["sums"])
    log.warning(
        "classes %s have fewer than %d images in the whole federation: left out",
        np.flatnonzero(few).tolist(),
        run.config.ncm_min_examples,
    )
    return floored


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
    gathered = _gather(strategy, run, grid, head, Phase.CLASS_SUMS)
    counts, known = np.zeros(len(run.classes)), list[int]()
    if gathered.total is not None:
        total = _floored(run, gathered.total, gathered.facts["secure"])
        counts = total["counts"]
        head, known = ncm_head_arrays(head, total["sums"], counts)
    else:
        log.warning("FedNCM: no usable class statistics arrived; the head starts random")
    _record(
        run,
        strategy.tally.record,
        started,
        method=HeadInit.NCM,
        nodes=gathered.boards,
        classes_set=known,
        class_counts=np.rint(counts).astype(int).tolist(),
        **gathered.facts,
    )
    return head


def federated_class_counts(
    strategy: EdgeSplitStrategy, run: ServerRun, grid: Grid, head: dict[str, np.ndarray]
) -> None:
    """Class balance without FedNCM's or Fed3R's statistics: one counts-only query (labels only,
    no image embedded) gives the run its class prior."""
    started = time.perf_counter()
    gathered = _gather(strategy, run, grid, head, Phase.CLASS_COUNTS)
    counts = gathered.total["counts"] if gathered.total is not None else None
    if counts is None:
        log.warning("class balance: no usable class counts arrived; training is not balanced")
        counts = np.zeros(len(run.classes))
    _record(
        run,
        strategy.tally.record,
        started,
        method=HeadInit.RANDOM,
        nodes=gathered.boards,
        class_counts=np.rint(counts).astype(int).tolist(),
        **gathered.facts,
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
    gathered = _gather(strategy, run, grid, head, Phase.RIDGE_SUMS)
    tally = strategy.tally.record
    if gathered.total is None:
        log.warning("%s: no usable ridge statistics arrived; the head starts random", method)
        no_classes = [0] * len(run.classes)
        _record(run, tally, started, method=method, nodes=0, classes_set=[], class_counts=no_classes, **gathered.facts)
        return head
    total = _floored(run, gathered.total, gathered.facts["secure"])
    stats = RidgeStats(gram=total["gram"], sums=total["sums"], counts=total["counts"])
    settings = ClosedFormSettings.from_config(run.config)
    last_inputs = run.trainable(head).last_inputs
    head, solved = closed_form_head(settings, method, head, stats, last_inputs, run.test.features, run.test.labels)
    counts = np.rint(stats.counts).astype(int)
    _record(
        run,
        tally,
        started,
        method=method,
        nodes=gathered.boards,
        classes_set=[c for c in range(len(counts)) if counts[c] > 0],
        class_counts=counts.tolist(),
        **solved,
        **gathered.facts,
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
