"""Split learning against its peer, on the same data, split and seed: full-model FedAvg (every
client trains the whole EfficientNet-Lite0 on raw images each round, as Flower's quickstart
examples do), edgesplit head only, edgesplit with the last backbone stage trained too, and the
centralised references (a linear probe on the frozen features; full fine-tuning).

    python -m simulations.comparison          # about 20 minutes on 2 cores

edgesplit's runs go through the real Flower runtime (simulation engine) with the default run
config (views and view-averaged evaluation included); the peer is plain PyTorch in this process
(simulations/full_model.py says why), at a lower resolution so that it fits the time budget.
Writes a table and two plots to BENCHMARKS.md (docs/comparison.png) and the per-round numbers to
docs/comparison.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import RunConfig
from common.kinds import EventKind
from common.protocol import Phase
from deploy.local_simulation import PROJECT_ROOT, flwr_run_results
from deploy.reference_probe import centralised_probe
from simulations.benchmark import markdown_table, save_figure, update_section
from simulations.full_model import (
    PeerConfig,
    build_model,
    centralised_finetune,
    fedavg_round,
    load_federated_data,
    run_full_model_fedavg,
)

COMMAND = "python -m simulations.comparison"


@dataclass
class Curve:
    """One federated run as the table and the plots see it."""

    name: str
    what: str
    accuracy: list[float]  # held-out accuracy after each round
    bytes_per_client: list[float]  # down + up, per client, per round
    client_seconds: list[float]  # mean local training seconds per client, per round
    round_seconds: list[float]  # wall time of each round
    peak_rss_mib: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def later_bytes(self) -> float:
        return float(np.mean(self.bytes_per_client[1:] or self.bytes_per_client))

    @property
    def later_seconds(self) -> float:
        return float(np.mean(self.client_seconds[1:] or self.client_seconds))


def edgesplit_run(
    tmp: Path, name: str, what: str, overrides: dict[str, Any], clients: int
) -> tuple[Curve, dict[str, Any]]:
    """One edgesplit federation through Flower; its curve from summary.json and events.jsonl."""
    summary, events = flwr_run_results(tmp, name, {"cache-dir": str(tmp / "cache"), **overrides}, clients)
    train = [e for e in events if e["event"] == EventKind.CLIENT_REPLY and e["phase"] == Phase.TRAIN]
    rounds = summary["rounds"]
    seconds = [
        float(np.mean([e["metrics"]["train-seconds"] for e in train if e["round"] == r["round"]])) for r in rounds
    ]
    curve = Curve(
        name=name,
        what=what,
        accuracy=[r["accuracy"] for r in rounds],
        bytes_per_client=[(r["bytes_down"] + r["bytes_up"]) / max(r["clients_ok"], 1) for r in rounds],
        client_seconds=seconds,
        round_seconds=[r["seconds"] for r in rounds],
        peak_rss_mib=max(e["metrics"].get("peak-rss-mb", 0.0) for e in train),
        extra={
            "round1_embed_seconds": float(np.mean([e["metrics"]["embed-seconds"] for e in train if e["round"] == 1]))
        },
    )
    return curve, summary


def peer_client_seconds(config: PeerConfig, image_size: int) -> float:
    """The peer's mean client training seconds for one round at edgesplit's image size: the
    like-for-like time (its accuracy runs use a lower resolution only to fit the budget)."""
    like_for_like = replace(config, image_size=image_size, rounds=1)
    data = load_federated_data(like_for_like)
    model = build_model(data.num_classes, config.seed)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    _, stats, _, _ = fedavg_round(model, state, data.clients, like_for_like, 1)
    return float(np.mean([s.seconds for s in stats]))


def plot(curves: list[Curve], references: dict[str, float], clients: int, path: Path) -> None:
    """Accuracy against cumulative bytes (all clients, both ways) and against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_bytes, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for curve, marker in zip(curves, "osD^v", strict=False):
        total_bytes = np.cumsum(curve.bytes_per_client) * clients
        wall = np.cumsum(curve.round_seconds)
        by_bytes.semilogx(total_bytes, curve.accuracy, marker=marker, ms=3, label=curve.name)
        by_time.plot(wall, curve.accuracy, marker=marker, ms=3, label=curve.name)
    for axis in (by_bytes, by_time):
        for (label, value), style in zip(references.items(), ("--", ":"), strict=False):
            axis.axhline(value, color="black", ls=style, lw=1, label=label)
        axis.set(ylabel="held-out accuracy", ylim=(0.5, 0.9))
        axis.grid(alpha=0.3, which="both")
    by_bytes.set(xlabel="bytes sent, all clients, both ways (cumulative)", title="accuracy against traffic")
    by_time.set(xlabel="wall time of the rounds (s, cumulative)", title="accuracy against time")
    by_time.legend(fontsize=7, loc="lower right")
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-rounds", type=int, default=12)
    parser.add_argument("--peer-image-size", type=int, default=128)
    parser.add_argument("--central-epochs", type=int, default=5)
    parser.add_argument("--cut-rounds", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30, help="edgesplit head-only rounds")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--subset", type=int, default=0, help="ELPV images used (0: all; smaller for a smoke run)")
    parser.add_argument("--image-size", type=int, default=224, help="edgesplit's input size (the run-config default)")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="edgesplit-comparison-") as work:
        tmp = Path(work)
        common = {"subset": args.subset, "export-model": False, "image-size": args.image_size}
        head, head_summary = edgesplit_run(
            tmp,
            "edgesplit, head only",
            "linear head on cached features",
            {**common, "num-server-rounds": args.rounds},
            args.clients,
        )
        probe = centralised_probe(RunConfig(cache_dir=str(tmp / "cache"), subset=args.subset), args.clients)
        cut, cut_summary = edgesplit_run(
            tmp,
            "edgesplit, cut 1",
            "head + last stage (1x1 conv 320->1280)",
            {**common, "cut": 1, "num-server-rounds": args.cut_rounds, "local-epochs": 2},
            args.clients,
        )
    peer_config = PeerConfig(
        image_size=args.peer_image_size, rounds=args.peer_rounds, subset=args.subset, num_clients=args.clients
    )
    data = load_federated_data(peer_config)
    peer = run_full_model_fedavg(peer_config, data)
    central = centralised_finetune(peer_config, args.central_epochs, data)
    del data
    peer_seconds_224 = peer_client_seconds(peer_config, args.image_size)
    peer_curve = Curve(
        name="full-model FedAvg (peer)",
        what=f"whole Lite0 on raw images, {args.peer_image_size} px",
        # the last round scored like edgesplit's: probabilities averaged over the eight views
        accuracy=[r.accuracy for r in peer.rounds[:-1]] + [peer.rounds[-1].accuracy_views],
        bytes_per_client=[r.bytes_down_per_client + r.bytes_up_per_client for r in peer.rounds],
        client_seconds=[r.client_seconds_mean for r in peer.rounds],
        round_seconds=[r.round_seconds for r in peer.rounds],
        peak_rss_mib=peer.peak_rss_mib,
        extra={"final_accuracy_as_is": peer.rounds[-1].accuracy},
    )
    central_accuracy = [e.accuracy if np.isnan(e.accuracy_views) else e.accuracy_views for e in central.epochs]
    curves = [head, cut, peer_curve]
    references = {
        f"centralised linear probe ({probe.accuracy:.3f})": probe.accuracy,
        f"centralised full fine-tuning, {args.peer_image_size} px ({central_accuracy[-1]:.3f})": central_accuracy[-1],
    }
    rows: list[tuple[str, ...]] = []
    for curve in curves:
        rows.append(
            (
                curve.name,
                curve.what,
                f"{curve.accuracy[-1]:.4f}",
                f"{max(curve.accuracy):.4f}",
                str(len(curve.accuracy)),
                f"{curve.later_bytes / 1e3:,.1f} KB",
                f"{peer_curve.later_bytes / curve.later_bytes:,.0f}x",
                f"{curve.later_seconds:.3f}",
                f"{peer_curve.later_seconds / curve.later_seconds:,.1f}x",
                f"{peer_seconds_224 / curve.later_seconds:,.1f}x",
                f"{curve.peak_rss_mib:.0f}",
            )
        )
    rows.append(("centralised linear probe", "logistic regression, frozen features", f"{probe.accuracy:.4f}"))
    rows.append(
        (
            "centralised full fine-tuning",
            f"whole Lite0, {args.peer_image_size} px, {args.central_epochs} epochs",
            f"{central_accuracy[-1]:.4f}",
            f"{max(central_accuracy):.4f}",
        )
    )
    columns = (
        "run",
        "what",
        "final acc.",
        "best acc.",
        "rounds",
        "bytes / client / round",
        "peer / this",
        "client s / round",
        "peer / this",
        f"peer at {args.image_size} px / this",
        "client peak RSS MiB",
    )
    rows = [row + ("",) * (len(columns) - len(row)) for row in rows]
    table = markdown_table(rows, columns)
    print(table)
    plot_path = args.output.parent / "docs" / "comparison.png"
    plot(curves, references, args.clients, plot_path)
    (args.output.parent / "docs" / "comparison.json").write_text(
        json.dumps(
            {
                "curves": [asdict(c) for c in curves],
                "probe": asdict(probe),
                "central_finetune": [asdict(e) for e in central.epochs],
                "head_only_final": head_summary["final"],
                "cut_final": cut_summary["final"],
                "peer_client_seconds_at_edgesplit_size": peer_seconds_224,
            },
            indent=1,
            default=float,
        )
        + "\n"
    )
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    update_section(
        args.output,
        "Split learning against full-model FedAvg (same data, split and seed)",
        f"Command: `{COMMAND}` ({(time.perf_counter() - started) / 60:.0f} minutes). Machine: {machine}.\n"
        "ELPV 4-level, 10 clients, Dirichlet 0.3, seed 42, the server's held-out 25%; each client holds\n"
        "back its local test share in every run. edgesplit: the default run config (30 rounds of 5\n"
        "local epochs, FedAvg, the eight flips and rotations embedded once, predictions averaged over\n"
        f"them), int8 ONNX engine, 224 px, through Flower; cut 1: {args.cut_rounds} rounds of 2 local epochs.\n"
        f"Peer: full-model FedAvg, {args.peer_rounds} rounds of 1 local epoch, SGD, random flips and\n"
        f"rotations, {args.peer_image_size} px (lower than edgesplit's 224 px so that it fits the time budget: it\n"
        "favours the peer's time and memory), all training images, plain PyTorch in one process; its\n"
        "last round is scored like edgesplit's, averaged over the eight views (the jump at its end).\n"
        "Bytes: everything a client sends and receives per round after the first (edgesplit: train and\n"
        "evaluate messages, serialized; the peer: the state dict both ways). Client seconds: local\n"
        "training per client per round after the first (the peer's in-memory images need no decoding);\n"
        f"'peer at {args.image_size} px': the peer's mean client seconds in one round at edgesplit's image size,\n"
        f"{peer_seconds_224:.2f} s, timed in the same command (the like-for-like ratio).\n\n"
        f"{table}\n\n"
        f"![accuracy against bytes and time](docs/{plot_path.name})\n",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
