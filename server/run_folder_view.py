"""What a run folder says, in one dictionary: the dashboard's API, the static report and the
TensorBoard scalars all read the run through this.

Reads only ``config.json``, ``events.jsonl`` and ``summary.json``, so it works for a run in
progress, a finished run, and a run folder copied from another machine. ``events.jsonl`` is read
incrementally: each refresh parses only the lines appended since the last one.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import protocol
from common.kinds import EventKind
from common.protocol import Phase
from server.run_folder import ROUND_NUMBERS

TIMELINE_ROUNDS = 40  # the timeline shows the latest rounds; the plots show them all


def _bounded(value: object, high: float, low: float = 0.0) -> float | None:
    """A number a node reported, as the dashboard may show it: finite and in [low, high], else
    None. The server screens replies (server/validation.py), but a run folder may come from
    anywhere, and one inf makes the state unanswerable as JSON."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high:
        return float(value)
    return None


def _finite(document: Any) -> Any:
    """``document`` with every non-finite float as None (JSON has no NaN or Infinity)."""
    if isinstance(document, float):
        return document if math.isfinite(document) else None
    if isinstance(document, dict):
        return {key: _finite(value) for key, value in document.items()}
    if isinstance(document, list | tuple):
        return [_finite(value) for value in document]
    return document


@dataclass
class ClientRow:
    """One node as the dashboard's client table shows it."""

    node: int
    board: str = ""  # the name its SuperNode was registered under, where it has one
    engine: str = ""
    machine: str = ""  # the CPU architecture it reports (x86_64, aarch64)
    golden_cosine: float | None = None  # its engine's golden check (None: not reported)
    samples: int = 0
    rounds_joined: int = 0
    last_seen: float = 0.0
    last_round: int = 0
    train_seconds: float = 0.0  # the latest round's
    embed_seconds: float = 0.0  # the first round's: embedding happens once
    bytes_up: int = 0
    bytes_down: int = 0
    peak_rss_mb: float = 0.0
    cpu_temp_c: float | None = None  # the latest reading, where the board has a CPU thermal zone
    failures: int = 0
    rejected: int = 0
    last_problem: str = ""


@dataclass
class RunView:
    """Incremental reader of one run folder."""

    run_dir: Path
    _offset: int = 0
    _partial: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    started: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    clients: dict[int, ClientRow] = field(default_factory=dict)
    timeline: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)  # round -> node -> cell
    problems: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False
    stopped: str | None = None  # why the run ended early, if it did
    last_release: dict[str, Any] = field(default_factory=dict)  # a DP run's latest dp-release event
    secure_sums: list[dict[str, Any]] = field(default_factory=list)  # each secure sum: query or round, boards
    _joined: dict[int, set[int]] = field(default_factory=dict)

    def refresh(self) -> bool:
        """Read what was appended to events.jsonl; True if anything was."""
        path = self.run_dir / "events.jsonl"
        with self._lock:
            if not path.is_file():
                return False
            with path.open("rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
            if not chunk:
                return False
            self._offset += len(chunk)
            text = self._partial + chunk.decode("utf-8", errors="replace")
            lines = text.split("\n")
            self._partial = lines.pop()  # a line still being written is kept for next time
            for line in lines:
                if line.strip():
                    try:
                        self._apply(json.loads(line))
                    except (json.JSONDecodeError, TypeError, KeyError, ValueError):
                        continue  # one bad line does not hide the rest of the run
            return True

    @property
    def version(self) -> str:
        """Changes whenever what ``state()`` returns would change."""
        summary = self.run_dir / "summary.json"
        return f"{self._offset}-{summary.stat().st_mtime_ns if summary.is_file() else 0}"

    def _apply(self, event: dict[str, Any]) -> None:
        kind, time = event.get("event"), float(event.get("time", 0.0))
        if kind == EventKind.RUN_START:
            self.started = event
        elif kind == EventKind.RUN_RESUMED:
            # A restarted server goes on after its checkpoint: rounds logged past it were redone.
            self.started, self.ended, self.stopped = event, False, None
            self.rounds = [r for r in self.rounds if int(r.get("round", 0)) <= int(event.get("from_round", 0))]
        elif kind == EventKind.ROUND_END:
            self.rounds.append(event)
        elif kind == EventKind.DP_RELEASE:  # never undone by a resume: the head was released
            self.last_release = event
        elif kind == EventKind.SECURE_SUM:
            dropped = sum(int(n) for n in dict(event.get("dropped", {})).values())
            summed = {"round": event.get("round"), "phase": event.get("phase"), "boards": event.get("boards_in_sum")}
            self.secure_sums.append({**summed, "dropped": dropped, "no_sum": event.get("no_sum")})
        elif kind == EventKind.RUN_END:
            self.ended, self.stopped = True, event.get("stopped")
        elif kind in (EventKind.CLIENT_REPLY, EventKind.CLIENT_FAILED, EventKind.CLIENT_REJECTED):
            self._apply_client(EventKind(kind), event, time)

    def _apply_client(self, kind: EventKind, event: dict[str, Any], time: float) -> None:
        node, server_round, phase = int(event["node"]), int(event.get("round", 0)), event.get("phase", "")
        row = self.clients.setdefault(node, ClientRow(node))
        row.last_seen = max(row.last_seen, time)
        row.last_round = max(row.last_round, server_round)
        row.board = str(event.get("board", row.board))
        cosine = event.get("golden_cosine")
        if isinstance(cosine, int | float) and cosine >= 0:
            row.golden_cosine = float(cosine)
        if kind == EventKind.CLIENT_REPLY:
            metrics = event.get("metrics", {})
            row.bytes_up += int(_bounded(event.get("bytes", 0), protocol.COUNT_LIMIT) or 0)
            row.bytes_down += int(_bounded(event.get("bytes_down", 0), protocol.COUNT_LIMIT) or 0)
            row.engine = event.get("engine", row.engine) or row.engine
            row.machine = str(event.get("machine", row.machine) or row.machine)
            peak = _bounded(metrics.get(protocol.PEAK_RSS_MB, 0.0), protocol.METRIC_RANGES[protocol.PEAK_RSS_MB][1])
            row.peak_rss_mb = max(row.peak_rss_mb, peak or 0.0)
            low, high = protocol.METRIC_RANGES[protocol.CPU_TEMP_C]
            if protocol.CPU_TEMP_C in metrics:
                row.cpu_temp_c = _bounded(metrics[protocol.CPU_TEMP_C], high, low)
            if phase == Phase.TRAIN:
                # Every reply repeats the embedding it used; it took time in the node's first round only.
                seconds = protocol.SECONDS_LIMIT
                embed = _bounded(metrics.get(protocol.EMBED_SECONDS, 0.0), seconds) or 0.0
                embed_seconds = embed if node not in self._joined else 0.0
                row.samples = int(_bounded(metrics.get(protocol.NUM_EXAMPLES), protocol.COUNT_LIMIT) or row.samples)
                row.train_seconds = _bounded(metrics.get(protocol.TRAIN_SECONDS, 0.0), seconds) or 0.0
                row.embed_seconds = max(row.embed_seconds, embed_seconds)
                self._joined.setdefault(node, set()).add(server_round)
                row.rounds_joined = len(self._joined[node])
                self._cell(server_round, node, "ok", row.train_seconds + embed_seconds)
            return
        reason = str(event.get("reason", ""))
        if kind == EventKind.CLIENT_FAILED:
            row.failures += 1
        else:
            row.rejected += 1
        row.last_problem = f"round {server_round} {phase}: {reason}"
        problem = {"round": server_round, "node": str(node), "phase": phase, "kind": kind.value, "reason": reason}
        self.problems.append(problem)
        if phase == Phase.TRAIN:
            self._cell(server_round, node, "failed" if kind == EventKind.CLIENT_FAILED else "rejected", 0.0, reason)

    def _cell(self, server_round: int, node: int, status: str, seconds: float, reason: str = "") -> None:
        self.timeline.setdefault(server_round, {})[node] = {"status": status, "seconds": seconds, "reason": reason}

    def _status(self) -> str:
        if self.ended:
            return f"stopped: {self.stopped}" if self.stopped else "finished"
        return "running" if self.started else "waiting for the run to start"

    def state(self) -> dict[str, Any]:
        """Everything the dashboard shows, JSON-ready."""
        self.refresh()
        config = _read_json(self.run_dir / "config.json")
        summary = _read_json(self.run_dir / "summary.json")
        with self._lock:
            return _finite(self._state(config, summary))

    def _state(self, config: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
        """``state()``'s document; the caller holds the lock."""
        latest = self.rounds[-1] if self.rounds else {}
        clients = sorted(self.clients.values(), key=lambda c: (-(c.failures + c.rejected), c.node))
        shown_rounds = sorted(self.timeline)[-TIMELINE_ROUNDS:]
        return {
            "run_dir": str(self.run_dir),
            "status": self._status(),
            "config": config.get("run_config", {}),
            "classes": config.get("classes", []),
            "backbone": {
                **config.get("backbone", {}),
                "engine": self.started.get("engine", ""),
            },
            "model_dir": summary.get("model_dir"),
            "num_rounds": config.get("run_config", {}).get("num-server-rounds"),
            "rounds": [_round_fields(r) for r in self.rounds],
            "confusion_matrix": latest.get("confusion_matrix", []),
            "per_class_recall": latest.get("per_class_recall", []),
            "matrix_round": latest.get("round"),
            # node ids are 64-bit: as strings, so that JavaScript does not round them
            "clients": [{**asdict(c), "node": str(c.node)} for c in clients],
            "timeline": [
                {"round": r, "cells": {str(n): cell for n, cell in sorted(self.timeline[r].items())}}
                for r in shown_rounds
            ],
            "problems": self.problems[-50:],
            "final": summary.get("final"),
            "privacy": _privacy(config.get("run_config", {}), self.rounds, self.last_release),
            "secure_sums": {
                "used": bool(config.get("run_config", {}).get("secure-sums")),
                "sums": self.secure_sums[-5:],
            },
            "operating_points": summary.get("operating_points", []),
        }


_ROUND_KEYS = ("round", *ROUND_NUMBERS)


def _round_fields(event: dict[str, Any]) -> dict[str, Any]:
    return {key: event.get(key) for key in _ROUND_KEYS}


def _privacy(
    run_config: dict[str, Any], rounds: list[dict[str, Any]], last_release: dict[str, Any]
) -> dict[str, Any] | None:
    """A DP run's budget so far: epsilon after the latest release (which counts every release before
    it, a round that stopped before its record included), else after the latest round, at the run's
    delta (None without DP)."""
    if not run_config.get("dp-clipping-norm"):
        return None
    spent = [r for r in rounds if isinstance(r.get("dp_epsilon"), int | float)]
    if isinstance(last_release.get("epsilon"), int | float):
        spent = [{"dp_epsilon": last_release["epsilon"], "round": last_release.get("round", 0)}]
    return {
        "epsilon": spent[-1]["dp_epsilon"] if spent else 0.0,
        "delta": run_config.get("dp-delta"),
        "round": spent[-1]["round"] if spent else 0,
        "noise_multiplier": run_config.get("dp-noise-multiplier"),
        "clipping_norm": run_config.get("dp-clipping-norm"),
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # absent, or being replaced right now
        return {}
    return document if isinstance(document, dict) else {}
