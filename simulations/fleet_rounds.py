"""Round time of a deployed fleet: ``flower-superlink`` (TLS, authenticated SuperNodes) and one
``flower-supernode`` process per board on this machine (deploy/local_fleet.py), head only,
ELPV split over the boards.

Each board runs a new ClientApp process per message, so what a process costs to start and hold is
what a round costs. One short run fills the boards' caches (backbone, embeddings); a second, warm
run is measured. With ``--compare-rev REV`` the code at that git revision is measured the same way
in the same command (the SuperLink gets that revision's app; the boards share their caches), so
the ratio in the table is between two revisions on one machine at one time.

    python -m simulations.fleet_rounds --boards 5 --rounds 5 --compare-rev <rev>
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.kinds import EventKind
from deploy.local_fleet import Board, LocalDeployment
from deploy.local_simulation import PROJECT_ROOT
from simulations.benchmark import markdown_table, update_section

COMMAND = "python -m simulations.fleet_rounds"
SECTION = "A deployed fleet: round time and ClientApp memory per message"


@dataclass(frozen=True)
class FleetResult:
    label: str
    boards: int
    rounds: int
    round_seconds: float  # mean over the warm run's rounds
    wall_seconds: float  # the warm run, `flwr run` to its exit
    clientapp_peak_rss_mb: float  # mean over the warm run's replies: one ClientApp process each
    final_accuracy: float


def cpu_class() -> str:
    """The CPU features that decide ONNX Runtime's int8 kernels (README, engines)."""
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    named = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimddot") if flag in flags]
    return ", ".join(named) or "none of avx2/avx512/vnni/asimddot"


def _run(deployment: LocalDeployment, config: dict[str, Any], timeout: float) -> float:
    shutil.rmtree(Path(config["runs-dir"]) / config["run-name"], ignore_errors=True)
    started = time.perf_counter()
    process = deployment.submit(config)
    output, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"run {config['run-name']} failed ({process.returncode}):\n{output[-4000:]}")
    return time.perf_counter() - started


def warm_run(
    label: str,
    app_dir: Path,
    workdir: Path,
    fleet: list[Board],
    config: dict[str, Any],
    rounds: int,
    timeout: float,
    during: Callable[[LocalDeployment, Path], None] | None = None,
) -> tuple[Path, float]:
    """Start the fleet, fill its caches with a one-round run, then run ``rounds`` rounds warm:
    (that run's folder, its wall time in seconds). ``during(deployment, run folder)`` runs beside
    the warm run, in a thread (it must return by itself, the run's end does not stop it)."""
    config = {"runs-dir": str(workdir / "runs"), "cache-dir": str(workdir / "server-cache"), **config}
    run_dir = workdir / "runs" / f"{label}-warm"
    with LocalDeployment(workdir / label, fleet, app_dir=app_dir) as deployment:
        print(f"{label}: {len(fleet)} boards online; filling their caches", flush=True)
        _run(deployment, {**config, "num-server-rounds": 1, "run-name": f"{label}-fill"}, timeout)
        print(f"{label}: measuring a warm run of {rounds} rounds", flush=True)
        warm = {**config, "num-server-rounds": rounds, "run-name": run_dir.name}
        with ThreadPoolExecutor(max_workers=1) as pool:
            beside = pool.submit(during, deployment, run_dir) if during is not None else None
            wall = _run(deployment, warm, timeout)
            if beside is not None:
                beside.result()
    return run_dir, wall


def events_of(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def measure(
    label: str, app_dir: Path, workdir: Path, boards: int, rounds: int, overrides: dict[str, Any], timeout: float
) -> FleetResult:
    """A warm run of ``boards`` boards, each a share of ELPV."""
    fleet = [
        Board(
            f"board-{index}",
            {"partition-id": index, "num-partitions": boards, "cache-dir": str(workdir / "board-caches" / str(index))},
        )
        for index in range(boards)
    ]
    run_dir, wall = warm_run(label, app_dir, workdir, fleet, {"min-clients": boards, **overrides}, rounds, timeout)
    events = events_of(run_dir)
    round_ends = [e for e in events if e["event"] == EventKind.ROUND_END]
    replies = [e for e in events if e["event"] == EventKind.CLIENT_REPLY]
    rss = [e["metrics"]["peak-rss-mb"] for e in replies if "peak-rss-mb" in e["metrics"]]
    summary = json.loads((run_dir / "summary.json").read_text())
    return FleetResult(
        label,
        boards,
        rounds,
        float(np.mean([e["seconds"] for e in round_ends])),
        wall,
        float(np.mean(rss)) if rss else float("nan"),
        float(summary["final"]["accuracy"]),
    )


def revision_app(revision: str, parent: Path) -> Path:
    """A checkout of ``revision`` (a detached git worktree) to submit as the Flower app."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", revision], cwd=PROJECT_ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    path = parent / f"app-{sha}"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=PROJECT_ROOT, check=True)
    return path


def table(results: list[FleetResult]) -> str:
    reference = results[-1]
    rows = [
        (
            r.label,
            f"{r.round_seconds:.2f}",
            f"{r.round_seconds / reference.round_seconds:.2f}",
            f"{r.wall_seconds:.1f}",
            f"{r.clientapp_peak_rss_mb:.0f}",
            f"{r.final_accuracy:.4f}",
        )
        for r in results
    ]
    columns = ("code", "mean round (s)", "vs this tree", "warm run wall (s)", "ClientApp peak RSS (MiB)", "accuracy")
    return markdown_table(rows, columns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boards", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare-rev", help="also measure the code at this git revision (e.g. the one before)")
    parser.add_argument("--run-config", default="", help="run-config overrides, Flower syntax")
    parser.add_argument(
        "--workdir", type=Path, help="keep keys, logs, caches and runs here (default: a temporary folder)"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)

    from deploy.simulate import parse_run_config

    overrides = parse_run_config(args.run_config)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgesplit-fleet-") as tmp:
        workdir = args.workdir.resolve() if args.workdir else Path(tmp)
        apps = [(f"{args.compare_rev} (before)", revision_app(args.compare_rev, workdir))] if args.compare_rev else []
        try:
            for label, app_dir in [*apps, ("this tree", PROJECT_ROOT)]:
                results.append(measure(label, app_dir, workdir, args.boards, args.rounds, overrides, args.timeout))
        finally:
            for _, app_dir in apps:
                subprocess.run(["git", "worktree", "remove", "--force", str(app_dir)], cwd=PROJECT_ROOT, check=False)
    text = table(results)
    print(text)
    update_section(
        args.output,
        SECTION,
        f"Command: `{COMMAND} --boards {args.boards} --rounds {args.rounds}"
        f"{f' --compare-rev {args.compare_rev}' if args.compare_rev else ''}"
        f"{f' --run-config {args.run_config!r}' if args.run_config else ''}`. "
        f"CPU: {cpu_class()}; {len(os.sched_getaffinity(0))} cores.\n"
        "One SuperLink (TLS, authenticated SuperNodes) and one SuperNode process per board on this machine,\n"
        "ELPV split over the boards, default run config (head only, onnx-int8, train and evaluate each round).\n"
        "Warm: a one-round run filled the boards' caches first. Each message on a board is a new ClientApp\n"
        "process; its peak RSS is what a board must hold per message.\n\n"
        f"{text}\n",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
