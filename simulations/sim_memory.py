"""Peak memory of a simulation: the summed resident set of every process below this one (the
SuperLink, the ServerApp, Flower's simulation runtime, Ray's GCS, raylet and ClientApp actors),
sampled every half second through one run. Summed RSS counts pages the processes share once per
process: an upper bound on what the machine holds.

    python -m simulations.sim_memory --clients 1000 --run-config "num-server-rounds=1 views='none'"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deploy.local_simulation import flwr_run, process_tree
from deploy.simulate import parse_run_config


def tree_rss_mib(pid: int) -> float:
    """The summed VmRSS of ``pid``'s descendants, in MiB."""
    total = 0
    for child in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


@dataclass
class Peak:
    mib: float = 0.0  # the largest summed resident set seen
    processes: int = 0  # how many processes held it


@contextlib.contextmanager
def peak_memory(interval: float = 0.5) -> Iterator[Peak]:
    """The peak summed resident set of this process's descendants while the block runs, sampled
    every ``interval`` seconds in a thread."""
    peak, done = Peak(), threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            rss = tree_rss_mib(os.getpid())
            if rss > peak.mib:
                peak.mib, peak.processes = rss, len(process_tree(os.getpid()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--run-config", default="num-server-rounds=1 views='none'")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-sim-memory-"))
    config = {"export-model": False, "runs-dir": str(tmp / "runs"), "run-name": "memory"}
    config.update(parse_run_config(args.run_config))
    started = time.monotonic()
    with peak_memory() as peak:
        result = flwr_run(config, args.clients, tmp / "home", timeout=args.timeout)
    summary_path = tmp / "runs" / "memory" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        json.dumps(
            {
                "clients": args.clients,
                "run_config": args.run_config,
                "returncode": result.returncode,
                "wall_seconds": round(time.monotonic() - started, 1),
                "peak_tree_rss_mib": round(peak.mib),
                "processes_at_peak": peak.processes,
                "rounds": [
                    {key: record.get(key) for key in ("round", "accuracy", "macro_f1", "seconds", "clients_ok")}
                    for record in summary.get("rounds", [])
                ],
            }
        )
    )
    return 0 if result.returncode == 0 and summary else 1


if __name__ == "__main__":
    sys.exit(main())
