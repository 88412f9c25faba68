"""One Ray node against two: the same simulated federation through Flower's runtime on a Ray
cluster started as a user starts one (``ray start --head``, then ``ray start --address``), with
one node of 2 CPUs, then two nodes of 1 CPU each, beside the reference run on the Ray instance
Flower starts itself (2 CPUs). Every run has 2 client slots (``client-resources-num-cpus=1``), so
what differs is only where the clients run. A one-round run first fills the embedding cache, so
every measured run is warm.

On one machine two nodes share its cores: the table shows that the path works and what it costs,
not a speed-up (for that, the second node must be another machine).

    python -m simulations.ray_nodes [--clients 10] [--rounds 3] [--run-config "views='none'"]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deploy.local_simulation import PROJECT_ROOT, flwr_run
from deploy.ray_cluster import cluster_report, local_ray_cluster
from deploy.simulate import parse_run_config
from simulations.benchmark import markdown_table, update_section
from simulations.fleet_rounds import cpu_class

COMMAND = "python -m simulations.ray_nodes"
SECTION = "The simulation past one Ray node: one node against two"


def cpu_model() -> str:
    """The CPU's model name (x86: /proc/cpuinfo's "model name")."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def measured_run(tmp: Path, name: str, config: dict[str, Any], clients: int, address: str) -> dict[str, Any]:
    """One run on the Ray cluster at ``address`` ("local": Flower's own instance): its summary and wall time."""
    run_config = {**config, "runs-dir": str(tmp / "runs"), "run-name": name}
    started = time.monotonic()
    result = flwr_run(
        run_config,
        clients,
        tmp / f"{name}-home",
        env={"RAY_ADDRESS": address},
        timeout=1800,
        federation={"client-resources-num-cpus": 1},
    )
    wall = time.monotonic() - started
    summary_path = tmp / "runs" / name / "summary.json"
    if result.returncode != 0 or not summary_path.is_file():
        raise RuntimeError(result.stdout[-3000:])
    summary = json.loads(summary_path.read_text())
    rounds = [record["seconds"] for record in summary["rounds"]]
    return {
        "accuracy": summary["final"]["accuracy"],
        "round_seconds": sum(rounds) / len(rounds),
        "wall_seconds": wall,
    }


def on_cluster(tmp: Path, name: str, config: dict[str, Any], clients: int, nodes: int) -> dict[str, Any]:
    """``measured_run`` on a fresh local cluster of ``nodes`` nodes (2 CPUs in all), with the nodes
    that ran a ClientApp actor, from the cluster's own tables."""
    with local_ray_cluster(nodes=nodes, cpus_per_node=2 // nodes) as address:
        measured = measured_run(tmp, name, config, clients, address)
        report = cluster_report(address)
    used = {actor["node"] for actor in report["actors"] if actor["class"] == "ClientAppActor"}
    return {**measured, "nodes": len(report["nodes"]), "nodes_with_clients": len(used)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run-config", default="views='none'", help="more run-config keys, Flower syntax")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)

    config: dict[str, Any] = {"export-model": False, **parse_run_config(args.run_config)}
    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-ray-nodes-"))
    config.setdefault("cache-dir", str(tmp / "cache"))
    measured_run(tmp, "warm-up", {**config, "num-server-rounds": 1}, args.clients, "local")
    config["num-server-rounds"] = args.rounds
    runs = {
        "Flower's own Ray instance (reference)": {
            **measured_run(tmp, "local", config, args.clients, "local"),
            "nodes": 1,
            "nodes_with_clients": 1,
        },
        "cluster, 1 node x 2 CPUs": on_cluster(tmp, "one-node", config, args.clients, nodes=1),
        "cluster, 2 nodes x 1 CPU": on_cluster(tmp, "two-nodes", config, args.clients, nodes=2),
    }
    one_node = runs["cluster, 1 node x 2 CPUs"]["round_seconds"]
    rows = [
        [
            label,
            f"{run['nodes']} / {run['nodes_with_clients']}",
            f"{run['accuracy']:.4f}",
            f"{run['round_seconds']:.2f}",
            f"{run['round_seconds'] / one_node:.2f}",
            f"{run['wall_seconds']:.1f}",
        ]
        for label, run in runs.items()
    ]
    columns = ("Ray", "nodes / with clients", "accuracy", "mean round (s)", "vs 1 node", "run wall (s)")
    table = markdown_table(rows, columns)
    print(table)
    body = (
        f'Command: `{COMMAND} --clients {args.clients} --rounds {args.rounds} --run-config "{args.run_config}"`. '
        f"CPU: {cpu_model()} ({cpu_class()}); {os.cpu_count()} cores, both nodes on this one machine.\n"
        f"ELPV, Dirichlet 0.3, head only, onnx-int8, warm embedding cache, {args.rounds} rounds (a round's "
        "time is the mean over them; the first includes each actor's first ClientApp load); 2 client slots "
        'in every run (`client-resources-num-cpus=1`). The clusters are started as in the README ("Past one machine"), '
        "the run attaches through `RAY_ADDRESS`; the nodes that ran a ClientApp are read from the cluster's "
        "actor table. Two nodes on one 2-core machine show that the path works and what it costs, not a "
        "speed-up. A cluster run's wall leaves out the cluster's start (`ray start`, some 15 s for two nodes "
        "here); the reference's includes the start of its own Ray.\n\n" + table
    )
    update_section(args.out, SECTION, body)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
