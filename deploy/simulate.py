"""The main job: a simulated federation of edge clients on the embedded default (ELPV, Lite0),
through the real Flower runtime, followed by the centralised reference probe.

    python -m deploy.simulate [--clients 10] [--run-config "num-server-rounds=20 head='mlp'"]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from common.config import RunConfig, check_simulated_split
from common.data import DataError
from common.kinds import DatasetKind
from deploy.local_simulation import PROJECT_ROOT, flwr_run
from deploy.reference_probe import centralised_probe
from server.run_folder import write_json_atomic


def parse_run_config(text: str) -> dict[str, object]:
    """Parse Flower's "key=value key2='text'" syntax with Flower's own parser."""
    from common.flower_glue import parse_config_args

    return parse_config_args(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10, help="simulated edge clients (num-supernodes)")
    parser.add_argument("--run-config", default="", help="run-config overrides, Flower syntax")
    parser.add_argument("--no-reference", action="store_true", help="skip the centralised reference probe")
    parser.add_argument(
        "--ray-address",
        default="",
        help="run the simulated clients on the Ray cluster at this address (HOST:PORT, or 'auto' for the one "
        "started on this machine); default: $RAY_ADDRESS, else a Ray instance of the run's own",
    )
    parser.add_argument(
        "--client-cpus", type=int, default=0, help="CPUs Ray reserves per simulated client (0: Flower's default, 2)"
    )
    args = parser.parse_args(argv)

    overrides = parse_run_config(args.run_config)
    overrides.setdefault("runs-dir", str(PROJECT_ROOT / "runs"))
    if overrides.get("resume-from"):  # relative to where the user is, not where Flower runs the app
        overrides["resume-from"] = str(Path(str(overrides["resume-from"])).expanduser().resolve())
    config = RunConfig.from_flower(overrides)  # fail fast, before starting Flower
    try:
        check_simulated_split(config, args.clients)
    except DataError as error:
        print(f"Cannot start: {error}", file=sys.stderr)
        return 2
    started = time.time()
    env = {"RAY_ADDRESS": args.ray_address} if args.ray_address else None
    federation = {"client-resources-num-cpus": args.client_cpus} if args.client_cpus > 0 else None
    result = flwr_run(
        overrides, args.clients, PROJECT_ROOT / ".flwr", env=env, stream_to=sys.stdout, federation=federation
    )
    candidates = [Path(config.resume_from) / "summary.json"] if config.resume_from else []
    candidates += Path(config.runs_dir).glob("*/summary.json")
    summaries = [p for p in candidates if p.is_file() and p.stat().st_mtime >= started]
    if result.returncode != 0 or not summaries:
        print(f"\nThe run did not finish (exit code {result.returncode}); see the log above.", file=sys.stderr)
        return 1
    summary_path = max(summaries, key=lambda p: p.stat().st_mtime)
    summary = json.loads(summary_path.read_text())
    if summary.get("stopped"):
        print(f"\nThe run stopped early: {summary['stopped']}", file=sys.stderr)
        return 1
    if not args.no_reference and config.dataset == DatasetKind.ELPV:
        print("\nCentralised reference probe on the same training embeddings (experimenter's view)...")
        probe = centralised_probe(config, args.clients)
        summary["reference"] = {"centralised_probe": asdict(probe)}
        write_json_atomic(summary_path, summary)
        federated = summary["final"]["accuracy"]
        print(f"\n{'':28}{'accuracy':>10}{'macro-F1':>10}")
        print(f"{'federated head':28}{federated:>10.4f}{summary['final']['macro_f1']:>10.4f}")
        label = f"centralised probe (C={probe.regularisation_c})"
        print(f"{label:28}{probe.accuracy:>10.4f}{probe.macro_f1:>10.4f}")
        print(f"gap federated - centralised: {100 * (federated - probe.accuracy):+.2f} points")
    print(f"\nSummary: {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
