"""The simulation past one Ray node: a two-node Ray cluster started here as a user starts one
(``ray start --head``, a second ``ray start --address``, 1 CPU each), a 2-client, 1-round ELPV run
through the real Flower runtime on it (``RAY_ADDRESS``, as ``edgesplit simulate --ray-address``
passes it), and what the cluster itself says it ran. About 50 s with the session's server engines
made (20 s more without)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.local_simulation import flwr_run
from deploy.ray_cluster import cluster_report, local_ray_cluster
from tests.conftest import with_server_engines

pytestmark = pytest.mark.flower

RUN = {"subset": 40, "num-server-rounds": 1, "local-epochs": 1, "views": "none", "export-model": False}


def test_a_simulation_runs_its_clients_on_both_nodes_of_a_ray_cluster_the_user_started(
    tmp_path: Path, server_engines: Path
) -> None:
    cache = with_server_engines(tmp_path / "cache", server_engines)
    config = {**RUN, "cache-dir": str(cache), "runs-dir": str(tmp_path / "runs"), "run-name": "cluster"}

    with local_ray_cluster(nodes=2, cpus_per_node=1) as address:
        before = cluster_report(address)
        result = flwr_run(
            config,
            2,
            tmp_path / "flwr-home",
            env={"RAY_ADDRESS": address},
            timeout=300,
            federation={"client-resources-num-cpus": 1},  # Flower's default, 2, fits on neither node
        )
        after = cluster_report(address)

    assert result.returncode == 0, result.stdout[-4000:]
    summary = json.loads((tmp_path / "runs" / "cluster" / "summary.json").read_text())
    assert [record["clients_ok"] for record in summary["rounds"]] == [2]
    nodes = {node["id"] for node in before["nodes"] if node["alive"]}
    assert len(nodes) == 2 and all(node["alive"] for node in after["nodes"])
    # the run's driver was the cluster's (not a Ray instance of its own), and a client ran on each node
    assert sum("flwr-simulation" in job for job in after["jobs"]) == 1
    assert {actor["node"] for actor in after["actors"] if actor["class"] == "ClientAppActor"} == nodes


def test_simulate_passes_the_ray_address_and_client_cpus_to_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    from deploy import simulate

    calls = []
    monkeypatch.setattr(simulate, "flwr_run", lambda *args, **kwargs: calls.append(kwargs) or _Failed())
    arguments = ["--clients", "2", "--run-config", "subset=40", "--no-reference"]
    assert simulate.main([*arguments, "--ray-address", "10.0.0.5:6379", "--client-cpus", "1"]) == 1
    assert simulate.main(arguments) == 1

    assert calls[0]["env"] == {"RAY_ADDRESS": "10.0.0.5:6379"}
    assert calls[0]["federation"] == {"client-resources-num-cpus": 1}
    assert calls[1]["env"] is None and calls[1]["federation"] is None


def test_without_an_address_a_run_gets_a_ray_instance_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from deploy.local_simulation import flower_env

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert flower_env(Path("/tmp/home"))["RAY_ADDRESS"] == "local"  # never a cluster someone left running
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert flower_env(Path("/tmp/home"))["RAY_ADDRESS"] == "10.0.0.5:6379"  # the user's, exported


class _Failed:
    returncode = 1
