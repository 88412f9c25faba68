"""A fleet under load, through the real deployment path: ``flower-superlink`` (TLS, authenticated
SuperNodes) and 10, then 30, ``flower-supernode`` processes on this machine, each board with a
small ImageFolder of its own, head only, 5 warm rounds.

Per fleet size: replies expected and received, instructions sent again (lost or overdue replies,
server/delivery.py), replies recovered that way, boards counted failed, rounds retried, and each
round's time against its slowest board's own time (the summed ages of that board's ClientApp
processes at their replies: start-up, work and nothing else).

With ``--restart-in-round K`` (default 2; 0: none), one board's SuperNode is killed (SIGKILL, no
goodbye) while it works on round K's training and started again at once, with its key, node config
and cache: the table says in which round it replied again. A run without a restart writes the section
"A fleet under load: 10 and 30 boards on one SuperLink", one with it a section of its own.

    python -m simulations.fleet_load --boards 10 30 --rounds 5 --restart-in-round 0
    python -m simulations.fleet_load --boards 30 --rounds 5 --restart-in-round 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common import protocol
from common.kinds import EventKind
from deploy.local_fleet import Board, LocalDeployment
from deploy.local_simulation import PROJECT_ROOT, process_tree
from simulations.benchmark import markdown_table, update_section
from simulations.fleet_rounds import cpu_class, events_of, warm_run

COMMAND = "python -m simulations.fleet_load"
SECTION = "A fleet under load: 10 and 30 boards on one SuperLink"
SECTION_RESTART = "A fleet under load with a board restarted mid-run"
CLASSES = ("ok", "crack")


@dataclass(frozen=True)
class LoadResult:
    boards: int
    expected: int  # replies: boards x 2 phases x rounds, less the restarted board's missed ones
    restart_round: int  # the round a board was killed and started again in (0: none)
    missed: int  # that board's phases from the kill to its first reply after it
    rejoined: int | None  # the round of that first reply (None: no restart, or it never replied again)
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


@dataclass
class Restart:
    """Beside the warm run: kill ``board``'s SuperNode (SIGKILL, with its ClientApp) while it works
    on round ``round``'s training, then start it again at once (deploy/local_fleet.py waits until
    the SuperLink counts the dead one offline: it refuses a second SuperNode for a node it counts
    online). ``node`` and the times are filled in as it happens."""

    board: str
    round: int
    timeout: float
    node: int = 0
    killed_at: float = 0.0  # wall clock, as the events' times
    online_at: float = 0.0

    def __call__(self, deployment: LocalDeployment, run_dir: Path) -> None:
        deadline = time.monotonic() + self.timeout
        self.node = deployment.node_id(self.board)
        # round K's training is sent right after round K-1 ends (round 1's after the nodes are met)
        before = (EventKind.NODES_MET, None) if self.round == 1 else (EventKind.ROUND_END, self.round - 1)
        while before not in (seen := {(e["event"], e.get("round")) for e in _events_so_far(run_dir)}):
            _tick(deadline, f"round {self.round} did not start", (EventKind.RUN_END, None) in seen)
        supernode = deployment.supernode(self.board).pid
        earlier = set(self._client_apps(supernode))  # the last phase's, if one is still exiting
        while not set(self._client_apps(supernode)) - earlier:
            _tick(deadline, f"{self.board} got no message in round {self.round}")
        deployment.stop_supernode(self.board, kill=True)
        self.killed_at = time.time()
        print(f"killed {self.board} (node {self.node}) in round {self.round}; starting it again", flush=True)
        deployment.start_supernode(self.board)
        deployment.wait_until_online(len(deployment.boards), max(1.0, deadline - time.monotonic()))
        self.online_at = time.time()
        print(f"{self.board} online again {self.online_at - self.killed_at:.1f}s after the kill", flush=True)

    @staticmethod
    def _client_apps(supernode: int) -> list[int]:
        """The ClientApp processes a SuperNode runs now (one per message it works on)."""
        return [pid for pid in process_tree(supernode) if "flwr-clientapp" in _command_line(pid)]

    def missed(self, events: list[dict[str, Any]], rounds: int) -> tuple[int, int | None]:
        """The board's train and evaluate phases from the kill up to its first reply after it, and
        that reply's round (None: it never replied again)."""
        replies = [e for e in events if e["event"] == EventKind.CLIENT_REPLY and e["node"] == self.node]
        after = [(e["round"], e["phase"] != "train") for e in replies if e["time"] > self.killed_at]
        first = min(after, default=(rounds + 1, False))  # (round, 0: train / 1: evaluate)
        missed = 2 * (first[0] - self.round) + int(first[1])
        return missed, first[0] if after else None


def _events_so_far(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("\n")]  # a line being written is not yet whole


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _tick(deadline: float, what: str, ended: bool = False) -> None:
    if ended or time.monotonic() > deadline:
        raise TimeoutError(f"{what} ({'the run ended' if ended else 'timed out'})")
    time.sleep(0.2)


def measure(boards: int, rounds: int, workdir: Path, timeout: float, restart_round: int = 0) -> LoadResult:
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
        "min-clients": boards - 1 if restart_round else boards,  # the round with the kill completes without it
        "round-timeout": 600,
        "export-model": False,
    }
    restart = Restart(fleet[-1].name, restart_round, timeout) if restart_round else None
    run_dir, _ = warm_run(f"{boards}-boards", PROJECT_ROOT, workdir, fleet, config, rounds, timeout, restart)
    events = events_of(run_dir)
    kinds = [e["event"] for e in events]
    round_ends = {e["round"]: e["seconds"] for e in events if e["event"] == EventKind.ROUND_END}
    slowest = board_seconds(events)
    missed, rejoined = restart.missed(events, rounds) if restart else (0, None)
    return LoadResult(
        boards=boards,
        expected=boards * 2 * rounds - missed,
        restart_round=restart_round,
        missed=missed,
        rejoined=rejoined,
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
    parser.add_argument(
        "--restart-in-round",
        type=int,
        default=2,
        help="kill the last board's SuperNode while it trains in this round and start it again at once (0: none)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    parser.add_argument("--keep", type=Path, help="keep each fleet's folder (runs, logs) under this folder")
    args = parser.parse_args(argv)
    if not 0 <= args.restart_in_round < args.rounds:
        parser.error(f"--restart-in-round must be 0 (none) or a round before the last ({args.rounds})")
    results = []
    for boards in args.boards:
        if args.keep:
            results.append(
                measure(boards, args.rounds, args.keep / f"{boards}-boards", args.timeout, args.restart_in_round)
            )
            continue
        with tempfile.TemporaryDirectory(prefix=f"edgesplit-load-{boards}-") as tmp:
            results.append(measure(boards, args.rounds, Path(tmp), args.timeout, args.restart_in_round))
    text = table(results)
    print(text)
    restart = args.restart_in_round
    update_section(
        args.output,
        SECTION_RESTART if restart else SECTION,
        f"Command: `{COMMAND} --boards {' '.join(map(str, args.boards))} --rounds {args.rounds} "
        f"--restart-in-round {restart}`. "
        f"CPU: {cpu_class()}; {len(os.sched_getaffinity(0))} cores, every process on this one machine.\n"
        "Each board: its own SuperNode process, key, 16-image ImageFolder (2 classes, 64 px) and cache;\n"
        "head only, onnx-int8, train and evaluate each round; a one-round run filled the caches first.\n"
        + (
            f"In round {restart} the last board's SuperNode is killed (SIGKILL, with its ClientApp) while it\n"
            "trains, and started again at once with its key, node config and cache; the SuperLink lets it\n"
            "in once it counts the dead one offline (two missed 30 s heartbeats at most), and the round goes\n"
            "on with the others. Replies expected leave out the phases that board missed, from the kill to\n"
            "its first reply after it (in brackets); the last column is the round of that reply.\n"
            if restart
            else ""
        )
        + "A board's own time is the summed age of its ClientApp processes at their replies (start-up and\n"
        "work); worst round / slowest board is the worst round's time over its slowest board's (target: at most 2).\n\n"
        f"{text}\n",
    )
    return 0


def table(results: list[LoadResult]) -> str:
    rows = [
        (
            str(r.boards),
            f"{r.received} / {r.expected}" + (f" ({r.missed} missed)" if r.missed else ""),
            str(r.resent),
            str(r.recovered),
            str(r.failed),
            str(r.retried),
            f"{r.mean_round:.1f}",
            f"{r.worst_ratio:.2f}",
            "-" if not r.restart_round else str(r.rejoined or "never"),
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
        "restarted board rejoined in round",
    )
    return markdown_table(rows, columns)


if __name__ == "__main__":
    sys.exit(main())
