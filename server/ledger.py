"""What a run counts: each round's record (summary.json's ``rounds[i]``) and the embedding work
of the federation, each node counted once. Plain Python."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RoundRecord:
    """What one round did, as summary.json's ``rounds[i]`` shows it."""

    round: int
    accuracy: float = float("nan")
    macro_f1: float = float("nan")
    balanced_accuracy: float = float("nan")  # mean per-class recall
    loss: float = float("nan")
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0
    clients_ok: int = 0
    clients_failed: int = 0
    clients_rejected: int = 0
    backbones_sent: int = 0
    client_accuracy: float = float("nan")  # clients' local test shares, weighted by examples
    client_personal_accuracy: float = float("nan")  # the same shares, each client's personal head
    max_bytes_up_per_client: int = 0
    attempts: int = 1  # more than 1: the round was retried after too few usable updates
    secure: bool = False  # the updates were summed with secure sums (server/secure_rounds.py)
    dp_noise_multiplier: float = 0.0  # DP runs: the noise this round's head was released with (0: none)
    dp_epsilon: float = float("nan")  # DP runs: epsilon spent by the rounds so far, at the run's dp-delta


@dataclass
class RoundTally:
    """The round in progress: its record, added to by every message sent and reply received
    (retries of a round add to the same record), and its clock."""

    record: RoundRecord = field(default_factory=lambda: RoundRecord(round=0))
    started: float = field(default_factory=time.perf_counter)

    def begin(self, server_round: int) -> None:
        """Start counting ``server_round``, unless it is already being counted (a retry)."""
        if self.record.round != server_round:
            self.record = RoundRecord(round=server_round)
            self.started = time.perf_counter()

    def close(self) -> RoundRecord:
        self.record.seconds = time.perf_counter() - self.started
        return self.record


@dataclass
class EmbeddingLedger:
    """Images embedded (computed) or read from a cache, and skipped, over the whole run.

    Every reply of a node carries the counts of the embedding it used, so that a reply sent
    twice changes nothing; the ledger keeps each node's first report (a deployed ClientApp is a
    new process each round and reports its cache reads again: telemetry, not new work). The
    server's own held-out embedding and earlier processes of a resumed run come as ``base``.
    """

    base_computed: int = 0
    base_cached: int = 0
    base_skipped: int = 0
    by_node: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # node -> (computed, cached, skipped)

    def note(self, node: int, computed: int, cached: int, skipped: int) -> None:
        self.by_node.setdefault(node, (computed, cached, skipped))

    @property
    def computed(self) -> int:
        return self.base_computed + sum(counts[0] for counts in self.by_node.values())

    @property
    def cached(self) -> int:
        return self.base_cached + sum(counts[1] for counts in self.by_node.values())

    @property
    def skipped(self) -> int:
        return self.base_skipped + sum(counts[2] for counts in self.by_node.values())

    def totals(self) -> dict[str, int]:
        """What the checkpoint keeps (skipped images are a property of the data: every client
        reports its own again after a restart)."""
        return {"embedding_computed": self.computed, "embedding_cached": self.cached}


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"
