"""Reliability scenarios on the embedded default: the same 10-client ELPV federation (Dirichlet
0.3, 30 rounds) clean, with dropouts, with stragglers past the deadline, with one poisoned
client (NaN, 1000x-scaled, label-flipping), and killed mid-run then resumed. Each run goes
through the real Flower runtime; the table and a plot go into BENCHMARKS.md.

    python -m simulations.scenarios [--rounds 30] [--only stragglers,restart]

About 15 minutes on 2 cores (the first run embeds the images; the rest read the cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.kinds import EventKind
from deploy.local_simulation import PROJECT_ROOT, flwr_run
from server.checkpoint import Checkpoint, CheckpointError
from simulations.benchmark import markdown_table, save_figure, update_section

COMMAND = "python -m simulations.scenarios"
CLIENTS = 10
# Central evaluation only: federated evaluation adds a message per client per round and says
# nothing the scenarios compare.
BASE = {"fraction-evaluate": 0.0}
MULTIKRUM = {"strategy": "multikrum", "krum-malicious": 1, "min-clients": 5}


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    config: dict[str, Any] = field(default_factory=dict)
    federation: dict[str, Any] = field(default_factory=dict)  # simulation settings beside num-supernodes
    kill_after_round: int = 0  # > 0: SIGKILL the federation once this round is checkpointed, then resume


SCENARIOS = (
    Scenario("clean", "FedAvg, every client honest"),
    Scenario("dropouts", "30% of clients drop out at random each round", {"fault-dropout": 0.3}),
    Scenario(
        "stragglers",
        "2 clients answer after 9 s; round deadline 8 s",
        # (Retries cover round 1, where ten client processes start up on two cores.)
        {"fault-clients": "1:straggle,6:straggle", "fault-delay": 9.0, "round-timeout": 8.0, "round-retries": 5},
        # One simulated client process per client, so that the late ones hold up nobody else
        # (by default the simulation runs one client at a time on a 2-core machine).
        {"client_resources_num_cpus": 1, "init_args_num_cpus": CLIENTS},
    ),
    Scenario("nan, fedavg", "client 3 sends NaN", {"fault-clients": "3:nan-update"}),
    Scenario("nan, multikrum", "the same, Multi-Krum", {"fault-clients": "3:nan-update", **MULTIKRUM}),
    Scenario("scaled, fedavg", "client 3 sends 1000x its update", {"fault-clients": "3:scaled-update"}),
    Scenario("scaled, multikrum", "the same, Multi-Krum", {"fault-clients": "3:scaled-update", **MULTIKRUM}),
    Scenario("label-flip, fedavg", "client 3 trains on flipped labels", {"fault-clients": "3:label-flip"}),
    Scenario("label-flip, multikrum", "the same, Multi-Krum", {"fault-clients": "3:label-flip", **MULTIKRUM}),
    Scenario("label-flip, median", "the same, FedMedian", {"fault-clients": "3:label-flip", "strategy": "fedmedian"}),
    Scenario(
        "label-flip, trimmed mean",
        "the same, FedTrimmedAvg (beta 0.2)",
        {"fault-clients": "3:label-flip", "strategy": "fedtrimmedavg"},
    ),
    Scenario("clean, multikrum", "every client honest, Multi-Krum (its cost)", MULTIKRUM),
    Scenario("restart", "server killed after round 15, resumed", kill_after_round=15),
)


def _checkpointed_round(run_dir: Path) -> int:
    try:
        return Checkpoint.load(run_dir).round
    except CheckpointError:
        return 0


def run_scenario(scenario: Scenario, rounds: int, cache: Path, runs: Path) -> dict[str, Any]:
    name = scenario.name.replace(", ", "-").replace(" ", "-")
    run_dir = runs / name
    config = {**BASE, **scenario.config, "num-server-rounds": rounds, "cache-dir": str(cache)}
    config.update({"runs-dir": str(runs), "run-name": name})
    started = time.perf_counter()
    home = runs / f"{name}-flwr-home"
    kill_after, reached = min(scenario.kill_after_round, rounds - 1), 0
    if kill_after:
        flwr_run(config, CLIENTS, home, timeout=1800, kill_when=lambda: _checkpointed_round(run_dir) >= kill_after)
        reached = _checkpointed_round(run_dir)
        config = {**config, "resume-from": str(run_dir)}
    result = flwr_run(config, CLIENTS, home, timeout=1800, federation=scenario.federation)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if result.returncode != 0 or not summary or summary.get("stopped"):
        reason = summary.get("stopped") or result.stdout[-3000:]
        raise RuntimeError(f"scenario {scenario.name} did not finish: {reason}")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    rejected = [e for e in events if e["event"] == EventKind.CLIENT_REJECTED]
    return {
        "scenario": scenario,
        "accuracy": summary["final"]["accuracy"],
        "macro_f1": summary["final"]["macro_f1"],
        "rounds_completed": summary["completed_rounds"],
        "failed": sum(r["clients_failed"] for r in summary["rounds"]),
        "rejected": len(rejected),
        "first_rejection": rejected[0]["reason"] if rejected else "",
        "resumed_from": reached if kill_after else None,
        "per_round": [r["accuracy"] for r in summary["rounds"]],
        "wall_seconds": time.perf_counter() - started,
    }


FAULT_SCENARIOS = ("clean", "dropouts", "stragglers", "restart")  # the left panel; poisoning on the right


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Accuracy per round: faults and restart on the left, one poisoned client on the right
    (clean on both, as the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    groups = (
        [r for r in results if r["scenario"].name in FAULT_SCENARIOS],
        [r for r in results if r["scenario"].name not in FAULT_SCENARIOS[1:]],
    )
    titles = ("faults and a restart", "one of the clients poisoned")
    styles = ("-", "--", "-.", ":")
    for axis, group, title in zip(panels, groups, titles, strict=True):
        colours = [plt.get_cmap("tab10")(i) for i in range(10)]
        for index, result in enumerate(group):
            clean = result["scenario"].name == "clean"
            axis.plot(
                range(1, len(result["per_round"]) + 1),
                result["per_round"],
                color="black" if clean else colours[index % len(colours)],
                ls="-" if clean else styles[index % len(styles)],
                lw=2.4 if clean else 1.4,
                label=result["scenario"].name,
            )
        axis.set(xlabel="round", title=f"{title} ({CLIENTS} clients, ELPV, Dirichlet 0.3)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    panels[0].set_ylabel("held-out accuracy")
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    # "clean" always runs first: it is the baseline, and it fills the embedding cache, which the
    # stragglers' 8 s deadline needs (embedding 2,624 images takes longer than that).
    chosen = [s for s in SCENARIOS if not args.only or s.name in ("clean", *args.only.split(","))]

    results = []
    with tempfile.TemporaryDirectory(prefix="edgesplit-scenarios-") as tmp:
        cache, runs = Path(tmp) / "cache", Path(tmp) / "runs"
        for scenario in chosen:
            print(f"scenario {scenario.name}: {scenario.what} ...", flush=True)
            results.append(run_scenario(scenario, args.rounds, cache, runs))
            print(f"  accuracy {results[-1]['accuracy']:.4f}, {results[-1]['wall_seconds']:.0f}s", flush=True)

    clean = next((r["accuracy"] for r in results if r["scenario"].name == "clean"), None)
    rows = [
        (
            r["scenario"].name,
            r["scenario"].what,
            f"{r['accuracy']:.4f}",
            f"{100 * (r['accuracy'] - clean):+.2f}" if clean is not None else "",
            str(r["rounds_completed"]) + (f" (resumed after {r['resumed_from']})" if r["resumed_from"] else ""),
            str(r["failed"]),
            str(r["rejected"]),
            r["first_rejection"][:70],
        )
        for r in results
    ]
    columns = ("scenario", "what", "accuracy", "vs clean (points)", "rounds", "failed", "rejected", "first reason")
    table = markdown_table(rows, columns)
    print(table)
    plot_path = args.output.parent / "docs" / "scenarios.png"
    plot(results, plot_path)
    numbers = {r["scenario"].name: {k: v for k, v in r.items() if k != "scenario"} for r in results}
    plot_path.with_suffix(".json").write_text(json.dumps(numbers, indent=1) + "\n")
    update_section(
        args.output,
        "Reliability scenarios (faults, poisoned updates, restart)",
        f"Command: `{COMMAND} --rounds {args.rounds}`. {CLIENTS} simulated clients, ELPV 4-level, Dirichlet 0.3,\n"
        "seed 42, FedAvg unless named, central evaluation on the held-out 25%. Faults are injected by run\n"
        "config (`fault-clients`, `fault-dropout`, `fault-delay`); screening uses the defaults\n"
        "(`max-update-norm=50`, `max-update-ratio=100`). 'failed' counts client-rounds lost to crashes,\n"
        "dropouts and deadlines; 'rejected' counts replies the server screened out. Single runs: about\n"
        "+-1 point of run-to-run noise on this split.\n\n"
        f"{table}\n\n![accuracy per round, per scenario](docs/{plot_path.name})\n",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
