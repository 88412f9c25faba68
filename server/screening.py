"""Every reply is screened here before a Flower strategy sees it: replies are matched to the
nodes they answer, failures and silences are counted, malformed or poisoned replies are
rejected with a reason (``client-rejected`` events), and accepted ones are logged with their
bytes, engine and update norm. The checks themselves are plain functions in
``server/validation.py``.

What a strategy then gets is a normalised copy: one array record and one metric record holding
exactly the keys it averages (``AVERAGED``). Flower's strategies refuse a round whose replies'
metric keys differ, which a mixed fleet causes (a board with a thermal zone reports its CPU
temperature, one without cannot); the whole reply, telemetry included, is in the event log."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict

from common import protocol
from common.board_text import MAX_BOARD_NAME, board_text
from common.config import RunConfig
from common.flower_glue import from_array_record, wire_bytes
from common.kinds import EventKind
from common.protocol import ClassCounts, ClassStats, Phase, ProtocolError, ReplyStatus, RidgeStats
from server.dp import WEIGHT_KEY as DP_WEIGHT_KEY
from server.ledger import EmbeddingLedger, RoundTally
from server.run_folder import RunLog
from server.validation import (
    class_stats_reject_reason,
    examples_bounds,
    is_number,
    metrics_reject_reason,
    number,
    reject_reason,
    ridge_stats_reject_reason,
    statistics_reason,
    update_bounds,
    update_norm,
)

log = logging.getLogger(__name__)

# The metrics Flower's strategies average, per phase: every reply handed to them carries exactly these.
AVERAGED = {
    Phase.TRAIN: (protocol.NUM_EXAMPLES, protocol.TRAIN_LOSS, protocol.TRAIN_ACCURACY),
    Phase.EVALUATE: (protocol.NUM_EXAMPLES, protocol.LOSS, protocol.ACCURACY, protocol.MACRO_F1),
    Phase.CLASS_SUMS: (protocol.NUM_EXAMPLES,),
    Phase.RIDGE_SUMS: (protocol.NUM_EXAMPLES,),
    Phase.CLASS_COUNTS: (protocol.NUM_EXAMPLES,),
}
# Where a run fine-tunes personal heads, evaluation averages their scores too; a node that had
# nothing to fine-tune on (no training share) scores its personal head as the global one.
PERSONAL = {protocol.PERSONAL_ACCURACY: protocol.ACCURACY, protocol.PERSONAL_MACRO_F1: protocol.MACRO_F1}


@dataclass
class Screened:
    """The replies that may be used, and the nodes that failed or stayed silent."""

    accepted: list[Message] = field(default_factory=list)
    lost: set[int] = field(default_factory=set)  # their backbone status is unknown again


@dataclass
class _Candidate:
    reply: Message
    node: int
    size: int
    status: ReplyStatus
    arrays: dict[str, dict[str, np.ndarray]]  # record -> name -> array, each decoded once and checked


@dataclass(frozen=True)
class ScreeningBounds:
    """The limits every reply is held to, read once from the run config (each key's help in
    ``common/config.py`` says what it is for)."""

    round_timeout: float  # a node silent this long has failed
    max_weight_norm: float
    max_update_norm: float
    max_update_ratio: float
    max_num_examples: int
    golden_min_cosine: float
    dp_clipping_norm: float = 0.0  # > 0 in a DP run: no update over it, and every update weighs the same

    @classmethod
    def from_config(cls, config: RunConfig) -> ScreeningBounds:
        return cls(
            round_timeout=config.round_timeout,
            max_weight_norm=config.max_weight_norm,
            max_update_norm=config.max_update_norm,
            max_update_ratio=config.max_update_ratio,
            max_num_examples=config.max_num_examples,
            golden_min_cosine=config.golden_min_cosine,
            dp_clipping_norm=config.dp_clipping_norm,
        )

    @property
    def dp(self) -> bool:
        return self.dp_clipping_norm > 0


@dataclass(frozen=True)
class ExpectedReplies:
    """What a well-formed reply of this run carries: the run's backbone fingerprint, the arrays
    of each kind of reply by name and shape, and (``personal_scores``) its personal heads' scores
    in an evaluation reply."""

    fingerprint: str
    head_shapes: Mapping[str, tuple[int, ...]]
    class_stats_shapes: Mapping[str, tuple[int, ...]]
    ridge_stats_shapes: Mapping[str, tuple[int, ...]]
    ridge_feature_bound: float  # the largest squared norm one image's z can have (0: no bound known)
    class_counts_shapes: Mapping[str, tuple[int, ...]]
    personal_scores: bool = False  # personal-epochs > 0


class ReplyScreen:
    """Screens one phase's replies against what was sent and what the run expects."""

    def __init__(
        self,
        *,
        bounds: ScreeningBounds,
        expected: ExpectedReplies,
        run_log: RunLog,
        embedding: EmbeddingLedger,
        nodes: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        self.bounds, self.expected = bounds, expected
        self.run_log, self.embedding = run_log, embedding
        # The one-shot queries' replies: the record each must carry, and its check.
        self.statistics: dict[Phase, tuple[str, Callable[[dict[str, np.ndarray]], str | None]]] = {
            Phase.CLASS_SUMS: (
                protocol.CLASS_STATS,
                lambda a: class_stats_reject_reason(a, expected.class_stats_shapes),
            ),
            Phase.RIDGE_SUMS: (
                protocol.RIDGE_STATS,
                lambda a: ridge_stats_reject_reason(a, expected.ridge_stats_shapes, expected.ridge_feature_bound),
            ),
            Phase.CLASS_COUNTS: (
                protocol.CLASS_COUNTS,
                lambda a: statistics_reason(a, expected.class_counts_shapes, "class counts"),
            ),
        }
        # phase -> node -> num-examples of its first accepted reply in that phase
        self.first_examples: dict[Phase, dict[int, int]] = {}
        # node -> why it cannot take part as configured (its data, its node config), as its latest
        # reply said; reported once, forgotten when the node answers again
        self.setup_errors: dict[int, str] = {}
        # node -> its engine and golden check, as its latest reply said (summary.json's "nodes")
        self.nodes: dict[int, dict[str, Any]] = {} if nodes is None else nodes

    def screen(
        self,
        phase: Phase,
        sent: list[tuple[Message, int]],
        replies: list[Message],
        tally: RoundTally,
        start_head: dict[str, np.ndarray] | None,
    ) -> Screened:
        """Keep replies that are well-formed; count and log failures, silences and rejections.
        ``sent`` holds each message sent in this phase with the bytes it carried."""
        # The SuperLink answers for a dead node itself (src_node_id is then its own id), so
        # replies are matched to nodes by the message they answer; Flower sets ids when it sends.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m, _ in sent if m.metadata.message_id}
        origins = [sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies]
        result = Screened()
        timeout = f"no reply within round-timeout={self.bounds.round_timeout:g}s"
        for node in sorted({m.metadata.dst_node_id for m, _ in sent} - set(origins)):
            self._fail(node, phase, timeout, tally, result)
        candidates = []
        for reply, node in zip(replies, origins, strict=True):
            try:
                candidate = self._screen_reply(reply, node, phase, tally, result, start_head)
            except Exception as error:  # a reply no check foresaw must not end the run: refuse it, loudly
                log.exception("node %s: %s reply could not be screened", node, phase.value)
                self._reject(node, phase, f"unreadable reply ({type(error).__name__}: {error})"[:500], tally)
                continue
            if candidate is not None:
                candidates.append(candidate)
        norms = update_norms(candidates, start_head) if phase is Phase.TRAIN else {}
        bounds = self.bounds
        flagged = update_bounds(
            norms, bounds.max_update_norm, bounds.max_update_ratio, clipping_norm=bounds.dp_clipping_norm
        )
        for node, reason in self._examples_bounds(phase, candidates).items():
            flagged.setdefault(node, reason)
        for node, reason in flagged.items():
            self._reject(node, phase, reason, tally)
        byte_counts = {m.metadata.dst_node_id: size for m, size in sent}
        for candidate in candidates:
            if candidate.node not in flagged:
                self._accept(candidate, phase, tally, norms.get(candidate.node), byte_counts.get(candidate.node, 0))
                candidate.reply.content = for_strategy(
                    phase, candidate.reply.content, self.expected.personal_scores, self.bounds.dp
                )
                result.accepted.append(candidate.reply)
        return result

    def _screen_reply(
        self,
        reply: Message,
        node: int,
        phase: Phase,
        tally: RoundTally,
        result: Screened,
        start_head: dict[str, np.ndarray] | None,
    ) -> _Candidate | None:
        """One reply: counted, decoded once and checked; the candidate if it may be used."""
        if reply.has_error():
            said = board_text(reply.error.reason) or f"an error reply (code {reply.error.code}) that gives no reason"
            if reply.error.code in (protocol.SETUP_ERROR_CODE, protocol.REFUSAL_CODE):  # a retry answers the same
                self._setup_error(node, phase, said, tally, result)
            else:
                self._fail(node, phase, said, tally, result)
            return None
        self.setup_errors.pop(node, None)
        size = wire_bytes(reply)
        tally.record.bytes_up += size
        if phase is Phase.TRAIN:
            tally.record.max_bytes_up_per_client = max(tally.record.max_bytes_up_per_client, size)
        status, reason = reply_status(reply)
        arrays, unreadable = decode_arrays(reply.content)
        if status is not None:
            reason = (
                golden_reason(status, self.bounds.golden_min_cosine)
                or unreadable
                or self._reject_reason(reply, arrays, phase, node, status, start_head)
            )
            self.note_engine(node, status, refused=reason is not None)
            if reason is not None and status.fallback:
                result.lost.add(node)  # ask for its engine again: it may have fallen back
        if reason is None and status is not None:
            return _Candidate(reply, node, size, status, arrays)
        cosine = status.golden_cosine if status is not None and status.golden_cosine >= 0 else None
        self._reject(node, phase, str(reason), tally, golden_cosine=cosine)
        return None

    def _examples_bounds(self, phase: Phase, candidates: list[_Candidate]) -> dict[int, str]:
        """Nodes whose first num-examples in this phase is far above the round's median. Not for a
        DP run's updates: they are averaged with equal weights, so a claim buys nothing, and a
        verdict that depends on the other nodes' claims is not what the noise is calibrated to."""
        if self.bounds.dp and phase is Phase.TRAIN:
            return {}
        claims = {
            c.node: int(number(c.reply.content.metric_records[protocol.METRICS].get(protocol.NUM_EXAMPLES)))
            for c in candidates
        }
        return examples_bounds(claims, set(claims) - set(self.first_examples.get(phase, {})))

    def _fail(
        self, node: int, phase: Phase, reason: str, tally: RoundTally, result: Screened, setup_error: bool = False
    ) -> None:
        result.lost.add(node)
        if phase is Phase.TRAIN:
            tally.record.clients_failed += 1
        extra = {"setup_error": True} if setup_error else {}
        self.run_log.event(
            EventKind.CLIENT_FAILED, round=tally.record.round, phase=phase.value, node=node, reason=reason, **extra
        )
        log.warning("node %s failed in %s: %s", node, phase.value, reason)

    def _setup_error(self, node: int, phase: Phase, reason: str, tally: RoundTally, result: Screened) -> None:
        """A node that cannot take part as configured: counted as failed each time, reported (event
        and log) only when its reason is new, since asking again gives the same answer."""
        if self.setup_errors.get(node) == reason:
            result.lost.add(node)
            if phase is Phase.TRAIN:
                tally.record.clients_failed += 1
            return
        self.setup_errors[node] = reason
        self._fail(node, phase, reason, tally, result, setup_error=True)

    def _reject(self, node: int, phase: Phase, reason: str, tally: RoundTally, **extra: Any) -> None:
        if phase is Phase.TRAIN:
            tally.record.clients_rejected += 1
        extra = {key: value for key, value in extra.items() if value is not None}
        reason = board_text(reason)  # it may quote what the board sent
        self.run_log.event(
            EventKind.CLIENT_REJECTED, round=tally.record.round, phase=phase.value, node=node, reason=reason, **extra
        )
        log.warning("node %s: %s reply rejected: %s", node, phase.value, reason)

    def _accept(self, c: _Candidate, phase: Phase, tally: RoundTally, norm: float | None, bytes_down: int) -> None:
        # The event keeps every number the node reported (telemetry included), finite ones only.
        metrics: dict[str, Any] = {
            board_text(k, MAX_BOARD_NAME): v for k, v in c.reply.content[protocol.METRICS].items() if is_number(v)
        }
        self.run_log.event(
            EventKind.CLIENT_REPLY,
            round=tally.record.round,
            phase=phase.value,
            node=c.node,
            bytes=c.size,
            bytes_down=bytes_down,
            engine=c.status.engine,
            machine=c.status.machine,
            golden_cosine=c.status.golden_cosine,
            metrics=metrics,
            **({"update_norm": round(norm, 6)} if norm is not None else {}),
            **({"notes": c.status.data_notes} if c.status.data_notes else {}),
        )
        claimed = int(number(metrics.get(protocol.NUM_EXAMPLES)))
        if claimed > 0:  # later replies are held to it (a node without a test share claims 0)
            self.first_examples.setdefault(phase, {}).setdefault(c.node, claimed)
        if phase in (Phase.TRAIN, Phase.CLASS_SUMS, Phase.RIDGE_SUMS):
            self.embedding.note(
                c.node,
                int(number(metrics.get(protocol.EMBEDDINGS_COMPUTED))),
                int(number(metrics.get(protocol.EMBEDDINGS_CACHED))),
                int(number(metrics.get(protocol.IMAGES_SKIPPED))),
            )

    def note_engine(self, node: int, status: ReplyStatus, refused: bool) -> None:
        self.nodes[node] = {
            "engine": status.engine,
            "machine": status.machine,
            "golden_cosine": None if status.golden_cosine < 0 else round(status.golden_cosine, 6),
            "fallback": status.fallback,
            "refused": refused,
        }

    def _reject_reason(
        self,
        reply: Message,
        decoded: dict[str, dict[str, np.ndarray]],
        phase: Phase,
        node: int,
        status: ReplyStatus,
        start_head: dict[str, np.ndarray] | None,
    ) -> str | None:
        content = reply.content
        if protocol.METRICS not in content.metric_records:
            return "reply carries no metrics"
        reason = metrics_reject_reason(dict(content.metric_records[protocol.METRICS].items()), AVERAGED[phase])
        if reason is not None:
            return reason
        arrays = None
        if phase in self.statistics:
            record, check = self.statistics[phase]
            if set(content.array_records) != {record}:
                return f"a {phase.value} reply must carry exactly {record!r}, got {sorted(content.array_records)}"
            reason = check(decoded[record]) or counts_reason(phase, decoded[record]["counts"], content)
            if reason is not None:
                return reason
        elif phase is Phase.TRAIN:
            if set(content.array_records) != {protocol.ARRAYS}:
                return f"reply must carry exactly the head arrays, got records {sorted(content.array_records)}"
            arrays = decoded[protocol.ARRAYS]
        elif content.array_records:
            return "an evaluation reply must not carry arrays"
        return reject_reason(
            arrays=arrays,
            metrics=dict(content.metric_records[protocol.METRICS].items()),
            reply_fingerprint=status.fingerprint,
            expected_shapes=self.expected.head_shapes if phase is Phase.TRAIN else None,
            expected_fingerprint=self.expected.fingerprint,
            max_norm=self.bounds.max_weight_norm,
            examples_before=self.first_examples.get(phase, {}).get(node),
            max_examples=self.bounds.max_num_examples,
            embedded=phase is not Phase.CLASS_COUNTS,  # labels only: nothing embedded to bound the count by
            start=start_head,
        )


def counts_reason(phase: Phase, counts: np.ndarray, content: RecordDict) -> str | None:
    """Statistics tied to the reply's num-examples: the images they count are the ones claimed
    (all of them for ridge sums and class counts; FedNCM leaves out classes below the floor)."""
    counted = float(np.sum(counts))
    claimed = number(content.metric_records[protocol.METRICS].get(protocol.NUM_EXAMPLES))
    if counted > claimed or (phase is not Phase.CLASS_SUMS and counted != claimed):
        return f"the statistics count {counted:.0f} images where the reply claims num-examples {claimed:.0f}"
    return None


def golden_reason(status: ReplyStatus, minimum: float) -> str | None:
    """Why a node's features cannot be averaged in: its engine failed the golden check (it says
    so itself, or its cosine is below the run's ``minimum``)."""
    if status.fallback or 0 <= status.golden_cosine < minimum:
        return (
            f"golden check failed: engine {status.engine} at mean cosine {status.golden_cosine:.4f} to the "
            f"server's features (golden-min-cosine {minimum:g}); {status.fallback or 'refused'}"
        )
    return None


def for_strategy(phase: Phase, content: RecordDict, personal_scores: bool, dp: bool) -> RecordDict:
    """What a Flower strategy may see of an accepted reply: its one array record, and one metric
    record with exactly the averaged keys (``AVERAGED``, and ``PERSONAL`` where the run scores
    personal heads); in a DP run, the weight the strategy averages by."""
    metrics = content.metric_records[protocol.METRICS]
    averaged: dict[str, int | float | list[int] | list[float]] = {
        key: number(metrics.get(key))
        for key in AVERAGED[phase]  # checked: finite numbers
    }
    if phase is Phase.EVALUATE and personal_scores:
        for key, fallback in PERSONAL.items():
            averaged[key] = number(metrics.get(key) if is_number(metrics.get(key)) else metrics.get(fallback))
    averaged[protocol.NUM_EXAMPLES] = int(number(averaged[protocol.NUM_EXAMPLES]))
    if dp:  # updates weigh equally, scores by examples
        averaged[DP_WEIGHT_KEY] = 1 if phase is Phase.TRAIN else averaged[protocol.NUM_EXAMPLES]
    normalised = RecordDict({protocol.METRICS: MetricRecord(averaged)})
    for name in (protocol.ARRAYS, protocol.CLASS_STATS, protocol.RIDGE_STATS, protocol.CLASS_COUNTS):
        if name in content.array_records:
            normalised[name] = content.array_records[name]
    return normalised


def update_norms(candidates: list[_Candidate], start: dict[str, np.ndarray] | None) -> dict[int, float]:
    """How far each update moved the head: what the update bounds are chosen from."""
    if start is None:
        return {}
    return {c.node: update_norm(c.arrays[protocol.ARRAYS], start) for c in candidates}


def decode_arrays(content: RecordDict) -> tuple[dict[str, dict[str, np.ndarray]], str | None]:
    """Every array of a reply, decoded once, or why one cannot be used: bytes that are no array,
    or a dtype other than float32 and float64, the only ones a board sends (client/privacy.py)."""
    decoded: dict[str, dict[str, np.ndarray]] = {}
    for record_name, record in content.array_records.items():
        decoded[record_name] = {}
        for name, array in record.items():
            try:
                value = array.numpy()
            except Exception as error:  # Flower's decoder raises whatever NumPy's .npy reader does
                return decoded, f"array {name!r} of {record_name!r} is not a readable array ({type(error).__name__})"
            if value.dtype not in (np.float32, np.float64):
                return decoded, f"array {name!r} of {record_name!r} has dtype {value.dtype}, not float32 or float64"
            decoded[record_name][name] = value
    return decoded, None


def reply_status(reply: Message) -> tuple[ReplyStatus | None, str | None]:
    """A reply's typed status, or why it has none."""
    record = reply.content.config_records.get(protocol.STATUS)
    if record is None:
        return None, "reply carries no status"
    try:
        return ReplyStatus.from_record(record), None
    except ProtocolError as error:
        return None, f"malformed status: {error}"


def class_stats_of(reply: Message) -> ClassStats:
    """The class statistics of a screened FedNCM reply."""
    return ClassStats.from_arrays(from_array_record(reply.content.array_records[protocol.CLASS_STATS]))


def ridge_stats_of(reply: Message) -> RidgeStats:
    """The ridge statistics of a screened Fed3R reply."""
    return RidgeStats.from_arrays(from_array_record(reply.content.array_records[protocol.RIDGE_STATS]))


def class_counts_of(reply: Message) -> np.ndarray:
    """The class counts of a screened counts reply."""
    return ClassCounts.from_arrays(from_array_record(reply.content.array_records[protocol.CLASS_COUNTS])).counts
