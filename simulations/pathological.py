"""Personal heads and FedNCM on a pathological split: 10 generated classes, 10 clients holding 2
classes each (flwr-datasets' PathologicalPartitioner), through the real Flower runtime.

    python -m simulations.pathological        # about 6 minutes on 2 cores

Three federations on the same data and seed, all with personal heads: the head initialised at
random, by FedNCM from the clients' class means, and by the federation's LDA classifier from
Fed3R's statistics. It reports the rounds each needs to reach
the centralised linear probe's plateau (within ``--tolerance`` of its accuracy, on the server's
held-out images) and, per round, the clients' local accuracy with the global head and with their
personal heads. Writes a table and a plot to BENCHMARKS.md (docs/pathological.png).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.config import MIN_GRAM_ENV
from common.data import LabelledFiles, partition
from common.kinds import EventKind, HeadInit, Partitioner

CLASSES = tuple(f"pattern-{c}" for c in range(10))
LABELS: dict[str, str] = {HeadInit.RANDOM: "random", HeadInit.NCM: "FedNCM", HeadInit.LDA: "LDA (Fed3R's statistics)"}


def pattern_image(label: int, rng: np.random.Generator, size: int = 64, contrast: float = 100.0) -> np.ndarray:
    """A class's picture: a grating at the class's own angle and colour, with a random phase,
    frequency jitter and noise, so that images of a class differ and classes stay apart (the
    lower ``contrast`` against the noise, the harder they are to tell apart)."""
    angle = np.pi * label / len(CLASSES)
    frequency = 0.25 + 0.03 * rng.standard_normal()
    y, x = np.mgrid[0:size, 0:size]
    wave = np.sin(frequency * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    colour = 0.5 + 0.5 * np.array([np.cos(angle), np.sin(angle), np.cos(2 * angle)])
    pixels = 127 + contrast * wave[..., None] * colour + rng.normal(0, 20, (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_pathological_data(
    root: Path,
    clients: int = 10,
    per_class: int = 40,
    test_per_class: int = 10,
    seed: int = 0,
    contrast: float = 100.0,
) -> Path:
    """``root/client-<k>/<class>/*.png``: each client's share of a pool of generated images, by
    the pathological partitioner (2 classes per client), and ``root/server-test``: the
    server's held-out images of every class. Returns ``root``."""
    rng = np.random.default_rng(seed)
    pool = root / "pool"
    paths, labels = [], []
    for label, name in enumerate(CLASSES):
        for index in range(per_class + test_per_class):
            folder = root / "server-test" / name if index < test_per_class else pool / name
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{index}.png"
            Image.fromarray(pattern_image(label, rng, contrast=contrast)).save(path)
            if index >= test_per_class:
                paths.append(str(path))
                labels.append(label)
    files = LabelledFiles(tuple(paths), tuple(labels), CLASSES)
    for k in range(clients):
        share = partition(files, clients, k, Partitioner.PATHOLOGICAL, seed, classes_per_client=2)
        for source, label in zip(share.paths, share.labels, strict=True):
            target = root / f"client-{k}" / CLASSES[label] / Path(source).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)  # a copy: a board's folder holds its own files
    return root


def run_config(root: Path, cache: Path, runs: Path, name: str, **overrides: Any) -> dict[str, Any]:
    """A folder run over the generated data: small images, every client every round."""
    return {
        "dataset": "folder",
        "class-names": ",".join(CLASSES),
        "data-dir": str(root),
        "server-test-dir": str(root / "server-test"),
        "image-size": 64,
        "views": "none",
        "local-epochs": 1,
        "learning-rate": 0.05,
        "personal-epochs": 5,
        "min-clients": 10,
        "export-model": False,
        "cache-dir": str(cache),
        "runs-dir": str(runs),
        "run-name": name,
        **overrides,
    }


def rounds_to_target(accuracy: list[float], initial: float, target: float) -> int | None:
    """The first round whose accuracy reaches ``target`` (0: the initial head already did)."""
    if initial >= target:
        return 0
    return next((r for r, value in enumerate(accuracy, start=1) if value >= target), None)


def rounds_to_stay(accuracy: list[float], initial: float, target: float) -> int | None:
    """The first round from which the accuracy stays at or above ``target`` to the end."""
    series = [initial, *accuracy]
    for start in range(len(series)):
        if all(value >= target for value in series[start:]):
            return start
    return None


def main(argv: list[str] | None = None) -> int:
    from deploy.local_simulation import PROJECT_ROOT, flwr_run
    from simulations.benchmark import markdown_table, save_figure, update_section

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tolerance", type=float, default=0.02, help="accuracy below the probe that counts as there")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="edgesplit-pathological-") as work:
        tmp = Path(work)
        root = write_pathological_data(tmp / "data")
        for method in (HeadInit.RANDOM, HeadInit.NCM, HeadInit.LDA):
            config = run_config(
                root, tmp / "cache", tmp / "runs", method, **{"head-init": method, "num-server-rounds": args.rounds}
            )
            # ~50 images a board, far below the Gram floor: for the LDA start each lets its clear Gram go
            gram = {MIN_GRAM_ENV: "2"} if method == HeadInit.LDA else None
            result = flwr_run(config, 10, tmp / f"home-{method}", env=gram, timeout=1800)
            run_dir = tmp / "runs" / method
            if result.returncode != 0 or not (run_dir / "summary.json").is_file():
                raise RuntimeError(result.stdout[-3000:])
            events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
            results[method] = {
                "summary": json.loads((run_dir / "summary.json").read_text()),
                "initial": next(e["accuracy"] for e in events if e["event"] == EventKind.INITIAL_EVALUATION),
            }
        probe = centralised_folder_probe(root, tmp / "cache")

    target = probe - args.tolerance
    rows, curves = [], {}
    for init, outcome in results.items():
        rounds = outcome["summary"]["rounds"]
        accuracy = [r["accuracy"] for r in rounds]
        curves[init] = {
            "accuracy": [outcome["initial"], *accuracy],
            "client_global": [r["client_accuracy"] for r in rounds],
            "client_personal": [r["client_personal_accuracy"] for r in rounds],
        }
        reached = rounds_to_target(accuracy, outcome["initial"], target)
        stays = rounds_to_stay(accuracy, outcome["initial"], target)
        rows.append(
            (
                LABELS[init],
                f"{outcome['initial']:.3f}",
                str(reached) if reached is not None else f"not in {args.rounds}",
                str(stays) if stays is not None else f"not in {args.rounds}",
                f"{accuracy[-1]:.3f}",
                f"{rounds[-1]['client_accuracy']:.3f}",
                f"{rounds[-1]['client_personal_accuracy']:.3f}",
                f"{sum(r['clients_ok'] for r in rounds)} / {sum(r['clients_rejected'] for r in rounds)}",
            )
        )
    columns = (
        "head initialisation",
        "accuracy before round 1",
        f"rounds to the probe's plateau ({target:.3f})",
        "rounds until it stays there",
        "final accuracy (server)",
        "clients: global head",
        "clients: personal heads",
        "updates accepted / rejected, all rounds",
    )
    table = markdown_table(rows, columns)
    print(table)
    plot_path = args.output.parent / "docs" / "pathological.png"
    plot(curves, probe, target, plot_path, save_figure)
    update_section(
        args.output,
        "Personal heads and FedNCM on a pathological split (generated data)",
        "Command: `python -m simulations.pathological`. 10 generated classes (gratings of a class's own\n"
        "angle and colour, 64 px), 40 images per class shared out by flwr-datasets' PathologicalPartitioner\n"
        "over 10 clients (2 classes each), 10 held-out images per class on the server; EfficientNet-Lite0,\n"
        f"linear head, FedAvg, 1 local epoch per round, {args.rounds} rounds, through Flower. Personal heads: each\n"
        "client fine-tunes the global head for 5 epochs on its own training share and scores both on its\n"
        "local test share (weighted mean over clients). The target is the centralised linear probe's\n"
        f"accuracy ({probe:.3f}, logistic regression on all clients' training features) minus {args.tolerance}.\n"
        "FedNCM's head starts on the plateau, but the first rounds of local training on two classes\n"
        "each, at the full early learning rate, pull the average off it before it returns: 'rounds until\n"
        "it stays there' counts that. The LDA head (from Fed3R's statistics; each simulated board lets\n"
        "its clear Gram go from 2 images) starts with weights large enough that the old absolute\n"
        "max-weight-norm refused every update (tests/test_personal_ncm.py reproduces it in process); the\n"
        "bound now counts from the round's starting head, and the last column shows every round's updates taken in.\n\n"
        f"{table}\n\n"
        f"![accuracy per round](docs/{plot_path.name})\n",
    )
    return 0


def centralised_folder_probe(root: Path, cache: Path) -> float:
    """The linear probe's accuracy on the generated data: every client's training features
    (read from the caches the runs filled), scored on the server's held-out images."""
    from common.config import RunConfig
    from deploy.reference_probe import centralised_probe

    config = RunConfig.from_flower(run_config(root, cache, root, "probe"))
    return centralised_probe(config, 10).accuracy


def plot(curves: dict[str, dict[str, list[float]]], probe: float, target: float, path: Path, save: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (server, clients) = plt.subplots(1, 2, figsize=(10, 3.6))
    for init, curve in curves.items():
        label = LABELS[init]
        server.plot(range(len(curve["accuracy"])), curve["accuracy"], marker="o", ms=3, label=label)
        rounds = range(1, len(curve["client_global"]) + 1)
        clients.plot(rounds, curve["client_global"], marker="o", ms=3, label=f"{label}: global head")
        clients.plot(rounds, curve["client_personal"], marker="s", ms=3, ls="--", label=f"{label}: personal heads")
    server.axhline(probe, color="black", ls="--", lw=1, label=f"centralised probe ({probe:.3f})")
    server.axhline(target, color="grey", ls=":", lw=1, label="target")
    server.set(xlabel="round (0: the initial head)", ylabel="server held-out accuracy", ylim=(0, 1.02))
    clients.set(xlabel="round", ylabel="clients' local test accuracy", ylim=(0, 1.02))
    for axis in (server, clients):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    save(figure, path)


if __name__ == "__main__":
    sys.exit(main())
