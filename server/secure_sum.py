"""The server's side of a secure sum: Flower's SecAgg+ over the run's own messages
(common/flower_glue.py holds Flower's parts; client/secure_sum.py the board's side).

One sum takes four exchanges with the boards asked: their public keys (setup), their encrypted
secret shares, forwarded to their neighbours (share keys), their masked parts, which ride on the
ordinary train or statistics message (collect), and the shares that take the masks off the sum
(unmask). The server learns the sum over the boards whose parts arrived, and never one part: a
board that drops after sharing its keys, or whose masked reply is refused, is left out of the sum
and its masks taken off with its key rebuilt from its neighbours' shares. What each stage asked,
got and cost is recorded (``StageRecord``), with every board that dropped and why.

The sum holds only if at least ``min_boards`` parts arrived and every board in it kept a majority
of its neighbours; otherwise there is no sum (``SumResult.reason``) and nothing is unmasked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import protocol, secure_sum
from common.board_text import board_text
from common.flower_glue import (
    SECURE_STAGE_RECORD,
    SecureKey,
    SecureStage,
    masked_arrays,
    unmask_sum,
    wire_bytes,
)
from server.validation import head_reject_reason, update_norm

log = logging.getLogger(__name__)

# (node, stage, why) for every board that left the sum
OnDropped = Callable[[int, str, str], None]
# why a board's collect-stage reply (its status; the part is masked) cannot go into the sum, or None
PartCheck = Callable[[Message, int], "str | None"]


@dataclass(frozen=True)
class SecureSettings:
    """How a run's secure sums are taken (run config: secure-shares, seed, round-timeout)."""

    shares: int
    seed: int
    timeout: float
    group_size: int = 100  # boards per sum: a larger federation is summed group by group


@dataclass
class StageRecord:
    """One stage of a secure sum: boards asked and answering, bytes both ways, seconds."""

    stage: str
    asked: int
    answered: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0


@dataclass
class SumResult:
    """A secure sum's outcome: the sum by name (None if there is none, and ``reason`` says why),
    the boards in it, each stage's record and the boards that dropped, by stage."""

    total: dict[str, np.ndarray] | None
    boards: int
    stages: list[StageRecord] = field(default_factory=list)
    dropped: dict[str, list[int]] = field(default_factory=dict)
    reason: str | None = None

    def add(self, other: SumResult) -> None:
        """Take in the sum of another group of boards (no sum of this one, if it had none)."""
        self.stages += other.stages
        for stage, nodes in other.dropped.items():
            self.dropped.setdefault(stage, []).extend(nodes)
        if other.total is None:
            self.reason = other.reason if self.reason is None else f"{self.reason}; {other.reason}"
            return
        self.total = other.total if self.total is None else {k: v + other.total[k] for k, v in self.total.items()}
        self.boards += other.boards

    def facts(self) -> dict[str, object]:
        """What the run records of it (events.jsonl, summary.json)."""
        return {
            "secure": True,
            "boards_in_sum": self.boards,
            "dropped": {stage: len(nodes) for stage, nodes in self.dropped.items()},
            "stages": [vars(s) for s in self.stages],
            **({"no_sum": self.reason} if self.reason else {}),
        }


class SecureSum:
    """Runs secure sums over ``grid``: each stage waits at most ``timeout`` seconds, a sum needs
    ``min_boards`` parts, and each board shares its secrets with ``shares`` boards (all of them in a
    smaller sum). ``seed`` draws the neighbour ring of a larger sum."""

    def __init__(
        self, grid: Grid, *, timeout: float, min_boards: int, shares: int, seed: int, on_dropped: OnDropped
    ) -> None:
        self.grid, self.timeout, self.min_boards, self.shares, self.seed = grid, timeout, min_boards, shares, seed
        self.on_dropped = on_dropped

    def run(self, collect: list[Message], shapes: Mapping[str, tuple[int, ...]], check: PartCheck) -> SumResult:
        """The sum of the parts the boards addressed by ``collect`` (their train or statistics
        messages) send, each part with ``shapes`` (by name); ``check`` screens what is clear in a
        collect-stage reply."""
        by_node = {m.metadata.dst_node_id: m for m in collect}
        result = SumResult(total=None, boards=0)
        if len(by_node) < self.min_boards:
            result.reason = f"{len(by_node)} board(s) asked, fewer than min-clients={self.min_boards}"
            return result
        share_number = secure_sum.share_count(len(by_node), self.shares)
        threshold = secure_sum.threshold_of(share_number)
        neighbours = secure_sum.neighbours_of(list(by_node), share_number, self.seed)
        setup = {
            SecureKey.SAMPLE_NUMBER: len(by_node),
            SecureKey.SHARE_NUMBER: share_number,
            SecureKey.THRESHOLD: threshold,
            SecureKey.CLIPPING_RANGE: 0.0,  # Flower's quantisation is not used: the parts are fixed point
            SecureKey.TARGET_RANGE: secure_sum.SCALE,
            SecureKey.MOD_RANGE: secure_sum.MOD_RANGE,
            SecureKey.MAX_WEIGHT: 0.0,
        }
        keys = self._setup(by_node, setup, result)
        sums = _Round(neighbours, threshold)
        forwarded = self._share_keys(by_node, keys, sums, result)
        parts = self._collect(by_node, forwarded, shapes, check, sums, result)
        if parts is None:
            return result
        shares = self._unmask(by_node, sums, parts[1], result)
        if shares is None:
            return result
        total = unmask_sum(parts[0], shares, sums.in_sum, keys, neighbours, secure_sum.MOD_RANGE)
        names = sorted(shapes)
        result.total = dict(zip(names, secure_sum.decode(total), strict=True))
        result.boards = len(sums.in_sum)
        return result

    # --- the four stages -----------------------------------------------------------------------

    def _setup(
        self, by_node: dict[int, Message], setup: dict[str, int | float], result: SumResult
    ) -> dict[int, tuple[bytes, bytes]]:
        """Each board's two public keys (the first stage)."""
        messages = {
            node: _message(m, {SecureKey.STAGE: SecureStage.SETUP, **setup}, config=True) for node, m in by_node.items()
        }
        keys: dict[int, tuple[bytes, bytes]] = {}
        for node, reply in self._exchange(SecureStage.SETUP, messages, result).items():
            record = reply.content.config_records[SECURE_STAGE_RECORD]
            first, second = record.get(SecureKey.PUBLIC_KEY_1), record.get(SecureKey.PUBLIC_KEY_2)
            if isinstance(first, bytes) and isinstance(second, bytes):
                keys[node] = (first, second)
            else:
                self._drop(node, SecureStage.SETUP, "its reply carries no public keys", result)
        return keys

    def _share_keys(
        self, by_node: dict[int, Message], keys: dict[int, tuple[bytes, bytes]], sums: _Round, result: SumResult
    ) -> dict[int, list[tuple[int, bytes]]]:
        """Each board's encrypted shares, by the neighbour they are for (the second stage)."""
        sums.active = set(keys)
        if not sums.enough(self.min_boards, result, SecureStage.SETUP):
            return {}
        messages: dict[int, Message] = {}
        for node in sorted(sums.active):
            public = {str(other): list(keys[other]) for other in sorted(sums.neighbours[node] & sums.active)}
            messages[node] = _message(by_node[node], {SecureKey.STAGE: SecureStage.SHARE_KEYS, **public})
        replies = self._exchange(SecureStage.SHARE_KEYS, messages, result)
        sums.active = set(replies)
        forwarded: dict[int, list[tuple[int, bytes]]] = {node: [] for node in sums.active}
        for node, reply in replies.items():
            record = reply.content.config_records[SECURE_STAGE_RECORD]
            destinations: Any = record.get(SecureKey.DESTINATION_LIST, [])
            ciphertexts: Any = record.get(SecureKey.CIPHERTEXT_LIST, [])
            if not isinstance(destinations, list) or not isinstance(ciphertexts, list):
                continue
            for destination, ciphertext in zip(destinations, ciphertexts, strict=False):
                if destination in forwarded and destination in sums.neighbours[node] and isinstance(ciphertext, bytes):
                    forwarded[destination].append((node, ciphertext))
        return forwarded if sums.enough(self.min_boards, result, SecureStage.SHARE_KEYS) else {}

    def _collect(
        self,
        by_node: dict[int, Message],
        forwarded: dict[int, list[tuple[int, bytes]]],
        shapes: Mapping[str, tuple[int, ...]],
        check: PartCheck,
        sums: _Round,
        result: SumResult,
    ) -> tuple[list[np.ndarray], set[int]] | None:
        """The sum of the masked parts (the third stage), and the boards that shared keys but are
        not in it."""
        if not forwarded:
            return None
        messages: dict[int, Message] = {}
        for node in sorted(sums.active):
            message = by_node[node]
            message.content.config_records[SECURE_STAGE_RECORD] = ConfigRecord(
                {
                    SecureKey.STAGE: SecureStage.COLLECT_MASKED_VECTORS,
                    SecureKey.CIPHERTEXT_LIST: [c for _, c in forwarded[node]],
                    SecureKey.SOURCE_LIST: [s for s, _ in forwarded[node]],
                }
            )
            messages[node] = message
        expected = [shapes[name] for name in sorted(shapes)]
        masked_sum: list[np.ndarray] | None = None
        for node, reply in self._exchange(SecureStage.COLLECT_MASKED_VECTORS, messages, result).items():
            part, reason = _masked_part(reply, node, expected, check)
            if part is None:
                self._drop(node, SecureStage.COLLECT_MASKED_VECTORS, str(reason), result)
                continue
            sums.in_sum.add(node)
            masked_sum = (
                part
                if masked_sum is None
                else [np.mod(a + b, secure_sum.MOD_RANGE) for a, b in zip(masked_sum, part, strict=True)]
            )
        dead = sums.active - sums.in_sum
        sums.active = set(sums.in_sum)
        if masked_sum is None or not sums.enough(self.min_boards, result, SecureStage.COLLECT_MASKED_VECTORS):
            return None
        return masked_sum, dead

    def _unmask(
        self, by_node: dict[int, Message], sums: _Round, dead: set[int], result: SumResult
    ) -> dict[int, list[bytes]] | None:
        """The shares that take the masks off: of each summed board's mask seed, of each dead
        board's key (the fourth stage)."""
        messages = {
            node: _message(
                by_node[node],
                {
                    SecureKey.STAGE: SecureStage.UNMASK,
                    SecureKey.ACTIVE_NODE_ID_LIST: sorted(sums.neighbours[node] & sums.in_sum),
                    SecureKey.DEAD_NODE_ID_LIST: sorted(sums.neighbours[node] & dead),
                },
            )
            for node in sorted(sums.in_sum)
        }
        shares: dict[int, list[bytes]] = {node: [] for node in sums.in_sum | dead}
        for node, reply in self._exchange(SecureStage.UNMASK, messages, result).items():
            record = reply.content.config_records[SECURE_STAGE_RECORD]
            owners: Any = record.get(SecureKey.NODE_ID_LIST, [])
            pieces: Any = record.get(SecureKey.SHARE_LIST, [])
            if isinstance(owners, list) and isinstance(pieces, list):
                for owner, piece in zip(owners, pieces, strict=False):
                    if owner in shares and isinstance(piece, bytes) and node in sums.neighbours[owner]:
                        shares[owner].append(piece)
        short = sorted(owner for owner, pieces in shares.items() if len(pieces) < sums.threshold)
        if short:
            result.reason = (
                f"too few boards returned their shares to take the masks off: {len(short)} board(s) have fewer "
                f"than the threshold of {sums.threshold}"
            )
            return None
        return shares

    # --- sending and recording -----------------------------------------------------------------

    def _exchange(self, stage: str, messages: dict[int, Message], result: SumResult) -> dict[int, Message]:
        """Send one stage's messages; the usable replies by node (each board that failed dropped)."""
        started = time.perf_counter()
        record = StageRecord(stage, asked=len(messages))
        record.bytes_down = sum(wire_bytes(m) for m in messages.values())
        sent = list(messages.values())
        replies = self.grid.send_and_receive(sent, timeout=self.timeout)
        by_id = {m.metadata.message_id: node for node, m in messages.items() if m.metadata.message_id}
        answered: dict[int, Message] = {}
        for reply in replies:
            node = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if node not in messages or node in answered:
                continue
            if reply.has_error():
                said = board_text(reply.error.reason) or f"error code {reply.error.code}"
                self._drop(node, stage, said, result)
                continue
            if SECURE_STAGE_RECORD not in reply.content.config_records:
                self._drop(node, stage, "its reply carries no stage record", result)
                continue
            record.bytes_up += wire_bytes(reply)
            answered[node] = reply
        for node in sorted(set(messages) - set(answered) - set(result.dropped.get(stage, []))):
            self._drop(node, stage, f"no reply within {self.timeout:g}s", result)
        record.answered = len(answered)
        record.seconds = round(time.perf_counter() - started, 3)
        result.stages.append(record)
        log.info("secure sum, %s: %d of %d boards answered", stage, record.answered, record.asked)
        return answered

    def _drop(self, node: int, stage: str, reason: str, result: SumResult) -> None:
        result.dropped.setdefault(stage, []).append(node)
        self.on_dropped(node, stage, reason)


@dataclass
class _Round:
    """Who is still in one sum: ``active`` after each stage, ``in_sum`` once parts arrived."""

    neighbours: dict[int, set[int]]
    threshold: int
    active: set[int] = field(default_factory=set)
    in_sum: set[int] = field(default_factory=set)

    def enough(self, min_boards: int, result: SumResult, stage: str) -> bool:
        """Whether the sum can go on after ``stage``: enough boards, each keeping a majority of its
        neighbours (else no board would return its shares, and nothing could be unmasked)."""
        if len(self.active) < min_boards:
            result.reason = (
                f"after the {stage} stage {len(self.active)} board(s) are left, fewer than min-clients={min_boards}"
            )
        elif any(len(self.neighbours[n] & self.active) < self.threshold for n in self.active):
            result.reason = f"after the {stage} stage a board has fewer than {self.threshold} of its neighbours left"
        else:
            return True
        log.warning("secure sum stopped: %s", result.reason)
        return False


def mean_of_sum(
    total: Mapping[str, np.ndarray],
    boards: int,
    start: Mapping[str, np.ndarray],
    max_weight_norm: float,
    dp_clipping_norm: float,
) -> tuple[dict[str, np.ndarray], dict[str, float], str | None]:
    """The round's averaged head and training metrics from the secure sum of the boards' weighted
    train parts (common/secure_sum.py), or why the sum cannot be used. No reply could be screened,
    so the sum is: finite, a positive weight (in a DP run exactly one per board), the average's
    arrays within max-weight-norm of the round's start, and (DP) its update within the clipping
    norm, as a mean of clipped updates must be. The weight must be a whole number."""
    weight = float(total[secure_sum.WEIGHT][0])
    # Each weight is a whole number of images, encoded exactly: a sum with a fraction holds a part
    # that is no honest board's (a made-up part lands on a whole number once in 2**20).
    if not all(np.all(np.isfinite(v)) for v in total.values()) or weight <= 0 or weight != round(weight):
        return {}, {}, f"the summed updates are not usable (total weight {weight:.6g}, or values not finite)"
    if dp_clipping_norm > 0 and abs(weight - boards) > 1e-3:
        return {}, {}, f"the summed weights are {weight:.6g} where {boards} boards of a DP run weigh 1 each"
    mean = {name: (total[name] / weight).astype(np.float32) for name in start}
    metrics = {key[1:]: float(total[key][0]) / weight for key in secure_sum.WEIGHTED_METRICS}
    metrics[protocol.NUM_EXAMPLES] = float(round(weight))
    reason = head_reject_reason(mean, {n: a.shape for n, a in start.items()}, max_weight_norm, start)
    if reason is None and dp_clipping_norm > 0 and update_norm(mean, start) > dp_clipping_norm * (1 + 1e-5):
        reason = (
            f"the average update's norm {update_norm(mean, start):.4g} exceeds dp-clipping-norm={dp_clipping_norm:g}"
        )
    if reason is None and not 0 <= metrics[protocol.TRAIN_ACCURACY] <= 1 + 1e-6:
        reason = f"the average training accuracy {metrics[protocol.TRAIN_ACCURACY]:.4g} is no accuracy"
    return mean, metrics, reason


def _message(template: Message, stage: dict[str, object], config: bool = False) -> Message:
    """A stage's message to the board ``template`` is for (with the run's instructions, for setup)."""
    content = RecordDict({SECURE_STAGE_RECORD: ConfigRecord(stage)})  # type: ignore[arg-type]
    if config:
        content[protocol.CONFIG] = template.content.config_records[protocol.CONFIG]
    return Message(
        content,
        dst_node_id=template.metadata.dst_node_id,
        message_type=template.metadata.message_type,
        group_id=template.metadata.group_id,
    )


def _masked_part(
    reply: Message, node: int, expected: list[tuple[int, ...]], check: PartCheck
) -> tuple[list[np.ndarray] | None, str | None]:
    """A collect-stage reply's masked part, or why it cannot go into the sum: what is clear in it
    fails ``check``, or the part is not the expected arrays of integers below the mod range."""
    reason = check(reply, node)
    if reason is not None:
        return None, reason
    try:
        part = masked_arrays(reply.content.config_records[SECURE_STAGE_RECORD])
    except Exception as error:  # whatever NumPy's reader raises for bytes that are no array
        return None, f"its masked part is not readable ({type(error).__name__})"
    if [p.shape for p in part] != expected or any(p.dtype != np.int64 for p in part):
        return None, "its masked part is not the run's arrays in fixed point"
    if any(p.size and (p.min() < 0 or p.max() >= secure_sum.MOD_RANGE) for p in part):
        return None, "its masked part leaves the sum's range"
    return part, None
