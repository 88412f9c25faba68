"""A fleet under load, through the real deployment path: ``flower-superlink`` (TLS, authenticated
SuperNodes) and 10, then 30, ``flower-supernode`` processes on this machine, each board with a
small ImageFolder of its own, head only, 5 warm rounds.

Per fleet size: replies expected and received, instructions sent again (lost or overdue replies,
server/delivery.py), replies recovered that way, boards counted failed, rounds retried, and each
round's time against its slowest board's own time (the summed ages of that board's ClientApp
processes at their replies: start-up, work and nothing else).

    python -m simulations.fleet_load --boards 10 30 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common import protocol
from common.kinds import EventKind
from deploy.local_fleet import Board
from deploy.local_simulation import PROJECT_ROOT
from simulations.benchmark import markdown_table, update_section
from simulations.fleet_rounds import cpu_class, events_of, warm_run

COMMAND = "python -m simulations.fleet_load"
SECTION = "A fleet under load: 10 and 30 boards on one SuperLink"
CLASSES = ("ok", "crack")


@dataclass(frozen=True)
class LoadResult:
    boards: int
    expected: int  # replies: boards x 2 phases x rounds
    received: int
    resent: int
    recovered: int
    failed: int
    retried: int
    mean_round: float
    worst_ratio: float  # max over rounds of round time / its slowest board's own time


def write_folders(root: Path, boards: int, per_class: int, size: int = 64) -> None:
    """One small ImageFolder per board and the server's test folder: each class its own mean tone."""
    rng = np.random.default_rng(0)
    for folder in [*(f"board-{i}" for i in range(boards)), "server-test"]:
        for position, name in enumerate(CLASSES):
            (root / folder / name).mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                pixels = np.clip(rng.normal(60 + 100 * position, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / folder / name / f"{index}.png")


def board_seconds(events: list[dict[str, Any]]) -> dict[int, float]:
    """Per round, the slowest board's summed ClientApp time (train and evaluate)."""
    per_board: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for event in events:
        if event["event"] == EventKind.CLIENT_REPLY and protocol.PROCESS_SECONDS in event["metrics"]:
            per_board[event["round"]][event["node"]] += float(event["metrics"][protocol.PROCESS_SECONDS])
    return {round_: max(nodes.values()) for round_, nodes in per_board.items()}


def measure(boards: int, rounds: int, workdir: Path, timeout: float) -> LoadResult:
    data = workdir / "data"
    write_folders(data, boards, per_class=8)
    fleet = [
        Board(f"board-{i}", {"data-dir": str(data / f"board-{i}"), "cache-dir": str(workdir / "caches" / str(i))})
        for i in range(boards)
    ]
    config = {
        "dataset": "folder",
        "class-names": ",".join(CLASSES),
        "server-test-dir": str(data / "server-test"),
        "min-clients": boards,
        "round-timeout": 600,
        "export-model": False,
    }
    run_dir, _ = warm_run(f"{boards}-boards", PROJECT_ROOT, workdir, fleet, config, rounds, timeout)
    events = events_of(run_dir)
    kinds = [e["event"] for e in events]
    round_ends = {e["round"]: e["seconds"] for e in events if e["event"] == EventKind.ROUND_END}
    slowest = board_seconds(events)
    return LoadResult(
        boards=boards,
        expected=boards * 2 * rounds,
        received=kinds.count(EventKind.CLIENT_REPLY),
        resent=kinds.count(EventKind.MESSAGE_RESENT),
        recovered=kinds.count(EventKind.REPLY_RECOVERED),
        failed=kinds.count(EventKind.CLIENT_FAILED),
        retried=kinds.count(EventKind.ROUND_RETRY),
        mean_round=float(np.mean(list(round_ends.values()))),
        worst_ratio=max((seconds / slowest[r] for r, seconds in round_ends.items() if slowest.get(r)), default=0.0),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boards", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    parser.add_argument("--keep", type=Path, help="keep each fleet's folder (runs, logs) under this folder")
    args = parser.parse_args(argv)
    results = []
    for boards in args.boards:
        if args.keep:
            results.append(measure(boards, args.rounds, args.keep / f"{boards}-boards", args.timeout))
            continue
        with tempfile.TemporaryDirectory(prefix=f"edgesplit-load-{boards}-") as tmp:
            results.append(measure(boards, args.rounds, Path(tmp), args.timeout))
    rows = [
        (
            str(r.boards),
            f"{r.received} / {r.expected}",
            str(r.resent),
            str(r.recovered),
            str(r.failed),
            str(r.retried),
            f"{r.mean_round:.1f}",
            f"{r.worst_ratio:.2f}",
        )
        for r in results
    ]
    columns = (
        "boards",
        "replies",
        "re-sent",
        "recovered",
        "failed",
        "rounds retried",
        "mean round (s)",
        "worst round / slowest board",
    )
    text = markdown_table(rows, columns)
    print(text)
    update_section(
        args.output,
        SECTION,
        f"Command: `{COMMAND} --boards {' '.join(map(str, args.boards))} --rounds {args.rounds}`. "
        f"CPU: {cpu_class()}; {len(os.sched_getaffinity(0))} cores, every process on this one machine.\n"
        "Each board: its own SuperNode process, key, 16-image ImageFolder (2 classes, 64 px) and cache;\n"
        "head only, onnx-int8, train and evaluate each round; a one-round run filled the caches first.\n"
        "A board's own time is the summed age of its ClientApp processes at their replies (start-up and\n"
        "work); the last column is the worst round's time over its slowest board's (target: at most 2).\n\n"
        f"{text}\n",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
