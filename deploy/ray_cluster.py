"""A Ray cluster on this machine, started and stopped as a user would (``ray start``), for the test and
the benchmark that run the simulation past one Ray node; and what such a cluster says it ran.

Flower's simulation runtime attaches to a running cluster itself: its Ray backend calls
``ray.init()`` without an address, and Ray then connects to the cluster named by ``RAY_ADDRESS``
(``deploy/local_simulation.py``, ``flower_env``, passes it to the SuperLink and so to the
simulation process). Nothing here schedules a client: this module only plays the user's part.

Every node started here has its own temporary directory in its command line, and is stopped by the
process ids found with it: ``ray stop`` would stop every Ray process on the machine, other users'
simulations included.

    python -m deploy.ray_cluster report HOST:PORT   # nodes, drivers and ClientApp actors, as JSON
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from deploy.local_simulation import free_port, process_tree, running

RAY = Path(sys.executable).parent / "ray"


def _ray_start(arguments: list[str], temp_dir: Path, cpus: int, env: Mapping[str, str]) -> None:
    command = [str(RAY), "start", *arguments, "--num-cpus", str(cpus), "--node-ip-address", "127.0.0.1"]
    command += ["--temp-dir", str(temp_dir), "--disable-usage-stats"]
    result = subprocess.run(command, env=dict(env), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


@contextlib.contextmanager
def local_ray_cluster(nodes: int = 2, cpus_per_node: int = 1, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """A head node and ``nodes - 1`` nodes joining it, on loopback; yields the address to give
    ``RAY_ADDRESS`` (``127.0.0.1:<port>``) and stops every node afterwards. The nodes' processes
    (and so the ClientApp actors they start) run in ``env`` (default: this process's, with the
    variable Ray asks for to keep accelerator variables as they are)."""
    node_env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", **(env or {})}
    node_env.pop("RAY_ADDRESS", None)
    # Short: Ray's sockets live under it, and a Unix socket path must stay under 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="esray-", dir="/tmp"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    try:
        _ray_start(["--head", "--port", str(port), "--include-dashboard=false"], temp_dir, cpus_per_node, node_env)
        for _ in range(nodes - 1):
            _ray_start(["--address", address], temp_dir, cpus_per_node, node_env)
        yield address
    finally:
        stop_local_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_local_cluster(temp_dir: Path, grace: float = 2.0) -> None:
    """Stop the Ray processes whose command line names ``temp_dir`` (each node's GCS, raylet,
    agents), and every process below them (the workers), by process id: SIGTERM, then SIGKILL
    for what still runs after ``grace`` seconds (the GCS and raylets take longer to heed SIGTERM:
    a test cluster needs no orderly end)."""
    marked = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if str(temp_dir) in cmdline.read_bytes().decode(errors="replace"):
                marked.append(int(cmdline.parent.name))
    pids = sorted({pid for root in marked for pid in [root, *process_tree(root)]} - {os.getpid()})
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        deadline = time.monotonic() + grace
        while any(map(running, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)


def cluster_report(address: str, timeout: float = 120) -> dict[str, Any]:
    """What the cluster at ``address`` holds, from a fresh driver process: ``nodes`` (id, alive,
    CPUs), ``jobs`` (each driver's command line: a Flower simulation is ``flwr-simulation``) and
    ``actors`` (class name and node id of every actor, finished ones included)."""
    result = subprocess.run(
        [sys.executable, "-m", "deploy.ray_cluster", "report", address],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"},
        cwd=Path(__file__).resolve().parent.parent,
    )
    if result.returncode != 0:
        raise RuntimeError(f"cannot read the Ray cluster at {address}:\n{result.stderr[-3000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def _report(address: str) -> dict[str, Any]:
    import ray

    # The actor and job tables: Ray's public state API (ray.util.state) needs the dashboard, which
    # the nodes here run without. On a Ray upgrade, check these two calls and their keys.
    from ray._private import state

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        nodes = [
            {"id": node["NodeID"], "alive": bool(node["Alive"]), "cpus": node["Resources"].get("CPU", 0)}
            for node in ray.nodes()
        ]
        jobs = [str(job.get("Entrypoint", "")) for job in state.jobs()]
        actors = [
            {"class": actor["ActorClassName"], "node": actor["Address"]["NodeID"]} for actor in state.actors().values()
        ]
    finally:
        ray.shutdown()
    return {"nodes": nodes, "jobs": jobs, "actors": actors}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "report":
        sys.exit(__doc__)
    print(json.dumps(_report(sys.argv[2])))
