"""Benchmark of the foundation: backbone throughput, embedding vs round time, bytes per round,
wall time with a cold and a warm cache, and federated vs centralised accuracy. Prints a table and
writes BENCHMARKS.md.

    python -m simulations.benchmark            # or: make benchmark   (about 6 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.backbones import build_backbone, get_spec, load_backbone_weights
from common.config import RunConfig
from common.data import load_elpv
from common.kinds import EventKind
from common.preprocess import decode_image
from common.protocol import Phase
from deploy.local_simulation import PROJECT_ROOT, flwr_run
from deploy.reference_probe import centralised_probe

COMMAND = "python -m simulations.benchmark"


def backbone_throughput(num_images: int = 96, batch_size: int = 32) -> dict[str, float]:
    """Images/s of the frozen Lite0 on real ELPV images, eager NCHW vs channels_last, same process."""
    spec = get_spec("efficientnet_lite0")
    model = build_backbone(spec.name, load_backbone_weights(spec.name))
    files = load_elpv().paths[:num_images]
    batch = torch.from_numpy(np.stack([spec.preprocess(decode_image(Path(p).read_bytes())) for p in files]))
    results = {}
    for name, memory_format in (("eager NCHW", torch.contiguous_format), ("eager channels_last", torch.channels_last)):
        net = model.to(memory_format=memory_format)
        with torch.inference_mode():
            net(batch[:batch_size].contiguous(memory_format=memory_format))  # warm-up
            started = time.perf_counter()
            for start in range(0, num_images, batch_size):
                net(batch[start : start + batch_size].contiguous(memory_format=memory_format))
            results[name] = num_images / (time.perf_counter() - started)
    return results


def federation(cache: Path, runs: Path, name: str, clients: int) -> dict[str, Any]:
    config = {"cache-dir": str(cache), "runs-dir": str(runs), "run-name": name}
    started = time.perf_counter()
    result = flwr_run(config, clients, runs / f"{name}-flwr-home", timeout=1500)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-3000:])
    summary = json.loads((runs / name / "summary.json").read_text())
    events = [json.loads(line) for line in (runs / name / "events.jsonl").read_text().splitlines()]
    replies = [e for e in events if e["event"] == EventKind.CLIENT_REPLY and e["phase"] == Phase.TRAIN]
    # Every reply repeats the embedding it used: count each node's first.
    first = {e["node"]: e for e in reversed(replies)}
    summary["client_embed_seconds"] = sum(e["metrics"].get("embed-seconds", 0.0) for e in first.values())
    summary["command_wall_seconds"] = wall
    return summary


def plot_rounds(cold: dict[str, Any], probe_accuracy: float, path: Path) -> None:
    """Accuracy and macro-F1 per round against the centralised probe; bytes on the wire per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in cold["rounds"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(rounds, [r["accuracy"] for r in cold["rounds"]], marker="o", ms=3, label="federated head, accuracy")
    left.plot(rounds, [r["macro_f1"] for r in cold["rounds"]], marker="s", ms=3, label="federated head, macro-F1")
    left.axhline(probe_accuracy, color="black", ls="--", lw=1, label="centralised probe, accuracy")
    left.set(xlabel="round", ylabel="held-out score", ylim=(0, 1), title="ELPV 4-level, 10 clients, Dirichlet 0.3")
    left.legend(loc="lower right", fontsize=8)
    left.grid(alpha=0.3)
    right.semilogy(rounds, [r["bytes_down"] for r in cold["rounds"]], marker="o", ms=3, label="down, all clients")
    right.semilogy(rounds, [r["bytes_up"] for r in cold["rounds"]], marker="s", ms=3, label="up, all clients")
    right.set(xlabel="round", ylabel="bytes", title="backbone once (round 1), then heads only")
    right.legend(fontsize=8)
    right.grid(alpha=0.3, which="both")
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    speed = backbone_throughput()
    with tempfile.TemporaryDirectory(prefix="edgesplit-bench-") as tmp:
        cache, runs = Path(tmp) / "cache", Path(tmp) / "runs"
        cold = federation(cache, runs, "cold", args.clients)
        warm = federation(cache, runs, "warm", args.clients)
        probe = centralised_probe(RunConfig(cache_dir=str(cache)), args.clients)

    rounds = cold["rounds"]
    later = rounds[1:]
    rows = [
        ("backbone, eager NCHW (img/s, batch 32, 224 px)", f"{speed['eager NCHW']:.1f}"),
        ("backbone, eager channels_last (img/s)", f"{speed['eager channels_last']:.1f}"),
        ("channels_last / NCHW", f"{speed['eager channels_last'] / speed['eager NCHW']:.2f}x"),
        (
            "embeddings computed, cold run / warm run",
            f"{cold['embedding']['computed']} / {warm['embedding']['computed']}",
        ),
        ("client embedding time, summed over clients (s)", f"{cold['client_embed_seconds']:.1f}"),
        ("round 1 time, cold (s): backbone shipping + embedding", f"{rounds[0]['seconds']:.1f}"),
        ("round 1 time, warm (s)", f"{warm['rounds'][0]['seconds']:.1f}"),
        ("later rounds, mean time (s)", f"{np.mean([r['seconds'] for r in later]):.2f}"),
        ("bytes down, round 1 cold (backbone to each client)", f"{rounds[0]['bytes_down'] / 1e6:.1f} MB"),
        ("bytes down per later round, all clients", f"{np.mean([r['bytes_down'] for r in later]) / 1e3:.1f} KB"),
        ("bytes up per later round, all clients", f"{np.mean([r['bytes_up'] for r in later]) / 1e3:.1f} KB"),
        ("bytes up per client per round, max", f"{max(r['max_bytes_up_per_client'] for r in rounds) / 1e3:.1f} KB"),
        ("end-to-end wall time, cold cache (s)", f"{cold['command_wall_seconds']:.1f}"),
        ("end-to-end wall time, warm cache (s)", f"{warm['command_wall_seconds']:.1f}"),
        ("warm / cold wall time", f"{warm['command_wall_seconds'] / cold['command_wall_seconds']:.2f}"),
        ("federated head, final test accuracy", f"{cold['final']['accuracy']:.4f}"),
        (f"centralised probe (C={probe.regularisation_c}), same train embeddings", f"{probe.accuracy:.4f}"),
        ("federated - centralised (points)", f"{100 * (cold['final']['accuracy'] - probe.accuracy):+.2f}"),
        ("federated head, final macro-F1 / probe macro-F1", f"{cold['final']['macro_f1']:.4f} / {probe.macro_f1:.4f}"),
    ]
    table = markdown_table(rows)
    print(table)
    plot_path = args.output.parent / "docs" / "foundation-rounds.png"
    plot_rounds(cold, probe.accuracy, plot_path)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    update_section(
        args.output,
        "Foundation: head-only federation on ELPV (EfficientNet-Lite0, 10 clients, Dirichlet 0.3)",
        f"Command: `{COMMAND}` (default run config: 30 rounds, FedAvg, linear head, 5 local epochs).\n"
        f"Machine: {machine}. Cold = empty cache; warm = the same command again on that cache.\n"
        "Times are from one run; ratios are within one command. The centralised probe is L2 logistic\n"
        "regression on the union of the clients' training embeddings (same head input normalisation),\n"
        "C by 3-fold cross-validation on that training set, scored on the same held-out 25% split.\n\n"
        f"{table}\n\n"
        f"![accuracy per round and bytes sent](docs/{plot_path.name})\n",
    )
    return 0


def save_figure(figure: Any, path: Path) -> None:
    """A benchmark's plot as a PNG beside BENCHMARKS.md (docs/), for the section to link."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown_table(rows: Sequence[Sequence[str]], columns: Sequence[str] = ("measure", "value")) -> str:
    """A Markdown table with the first column padded for reading as plain text too."""
    width = max(len(str(row[0])) for row in [*rows, columns])

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join([str(cells[0]).ljust(width), *map(str, cells[1:])]) + " |"

    rule = "|" + "-" * (width + 2) + "|" + "|".join("-------" for _ in columns[1:]) + "|"
    return "\n".join([line(columns), rule, *(line(row) for row in rows)])


def update_section(path: Path, title: str, body: str) -> None:
    """Replace the ``## title`` section of BENCHMARKS.md (or append it); other sections stay."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    heading = f"## {title}\n"
    start = text.find(heading)
    section = f"{heading}\n{body.rstrip()}\n"
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        following = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[following:] if following >= 0 else "")
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
