"""What secure sums cost and survive, through the real Flower runtime (simulation engine): the LDA
head's one-shot statistics and one round of head updates summed with SecAgg+ at 10 and 30 boards,
beside the same at 10 boards in the clear, and at 10 boards with one board dropping at each of the
protocol's four stages.

    python -m simulations.secure_protocol          # 7 Flower runs, about 10 minutes

Each row is one `flwr run` of ELPV (a stratified subset of 600 images, one view, so that 30 boards
embed little), Dirichlet 0.3, `head-init='lda'` with logit adjustment at tau 0.5, then one round.
The summed Gram must cover at least 100 images here (`min-sum-examples=100`; by default the feature
dimension, 1,280, which a 600-image subset cannot reach). Bytes are Flower's wire bytes of every
message of the sums (up: the boards' replies), per board asked; seconds are the server's wall time
of each sum (four exchanges, each costing the simulation's polling). Writes its table to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from common.config import MIN_GRAM_ENV
from common.kinds import EventKind

BASE = {
    "subset": 600,
    "views": "none",
    "head-init": "lda",
    "class-balance": "logit-adjusted",
    "logit-adjust-tau": 0.5,
    "num-server-rounds": 1,
    "export-model": False,
    "min-clients": 3,
    "min-sum-examples": 100,
}
SECURE = {"secure-sums": True}
ROWS: dict[str, tuple[int, dict[str, Any]]] = {
    "10 boards, clear (per-board floor lowered to 2)": (10, {}),
    "10 boards, secure": (10, SECURE),
    "30 boards, secure": (30, SECURE),
    **{
        f"10 boards, secure, board 3 drops at {stage}": (10, {**SECURE, "fault-clients": f"3:drop-at-{stage}"})
        for stage in ("setup", "share-keys", "collect", "unmask")
    },
}


def measure(work: Path, name: str, clients: int, keys: dict[str, Any]) -> tuple[str, ...]:
    from deploy.local_simulation import flwr_run_results

    env = None if keys.get("secure-sums") else {MIN_GRAM_ENV: "2"}
    summary, events = flwr_run_results(work, name, {**BASE, **keys}, clients, env=env)
    sums = [e for e in events if e["event"] == EventKind.SECURE_SUM]
    init, rounds = summary["head_init"], summary["rounds"]
    first = next(e for e in events if e["event"] == EventKind.INITIAL_EVALUATION)
    if sums:
        statistics, update = sums[0], sums[-1]
        up = [sum(s["bytes_up"] for s in e["stages"]) / clients for e in (statistics, update)]
        seconds = [sum(s["seconds"] for s in e["stages"]) for e in (statistics, update)]
        boards = f"{statistics['boards_in_sum']} / {update['boards_in_sum']}"
        dropped = ", ".join(f"{stage}: {n}" for stage, n in {**statistics["dropped"]}.items()) or "none"
    else:
        up = [init["bytes_up"] / clients, rounds[0]["bytes_up"] / clients]
        seconds = [init["seconds"], rounds[0]["seconds"]]
        boards = f"{init['nodes']} / {rounds[0]['clients_ok']}"
        dropped = "n/a"
    return (
        name,
        boards,
        dropped,
        f"{up[0] / 1e6:.2f} MB",
        f"{seconds[0]:.1f}",
        f"{up[1] / 1e3:.1f} KB",
        f"{seconds[1]:.1f}",
        f"{first['accuracy']:.4f} / {first['macro_f1']:.4f}",
        f"{summary['final']['accuracy']:.4f}",
    )


COLUMNS = (
    "run",
    "boards in the sums (statistics / round 1)",
    "dropped (statistics sum)",
    "statistics: up per board",
    "statistics: seconds",
    "round 1: up per board",
    "round 1: seconds",
    "LDA head: accuracy / macro-F1",
    "after round 1: accuracy",
)


def main(argv: list[str] | None = None) -> int:
    from deploy.local_simulation import PROJECT_ROOT
    from simulations.benchmark import markdown_table, update_section

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgesplit-secure-") as work:
        for name, (clients, keys) in ROWS.items():
            rows.append(measure(Path(work), name, clients, keys))
            print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(rows, COLUMNS)
    print(table)
    update_section(
        args.output,
        "Secure sums: bytes, seconds and boards dropping at each stage",
        "Command: `python -m simulations.secure_protocol`. Through the real Flower runtime (simulation engine),\n"
        "x86-64 AMD EPYC with AVX-512 VNNI, 2 cores; see the module's docstring for the settings.\n\n" + table + "\n",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
