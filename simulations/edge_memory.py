"""Peak memory of one edge client process, phase by phase: what a board must have free.

    python -m simulations.edge_memory            # about 1-2 minutes on 2 cores

Each scenario runs in a fresh Python process that imports what a deployed ClientApp imports
(``client.app``). The peak (VmHWM) is reset before each phase (``/proc/self/clear_refs``), so a
phase's figure is the process's high-water mark during that phase, imports included. Scenarios:
round 1 (receive and store the backbone, embed the board's images, train the head) and a later
round in a new process (a deployed SuperNode starts one ClientApp process per message; the
embeddings come from the cache and the backbone is not even built). Engine: torch, eager,
channels_last; the ONNX engines' peak memory is in ``simulations.engines``. Writes its section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from common.protocol import Instructions
from simulations.federation import PROJECT_ROOT, run_child

COMMAND = "python -m simulations.edge_memory"
TITLE = "Edge client memory: peak RSS of one client process (torch engine)"
# Memory left for the client on a board of each size, after a lite 64-bit OS (Raspberry Pi OS Lite, L4T).
USABLE_MIB = {"1 GB": 700, "2 GB": 1600, "4 GB": 3400, "8 GB": 7200}


def _phase(peaks: dict[str, float], name: str) -> None:
    """Record a phase: its peak RSS, and how much of the resident memory is file-backed pages
    (shared libraries: torch's CUDA build maps hundreds of MiB the kernel can drop under pressure)."""
    peaks[name] = _status("VmHWM")
    peaks[f"{name} file-backed"] = _status("RssFile")


def _status(field: str) -> float:
    """A /proc/self/status field in MiB (Linux)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def child(setup: dict[str, Any]) -> dict[str, float]:
    """One client process: runs the phases ``setup`` names and returns each phase's peak RSS."""
    import time

    import torch

    from client.edge_client import EdgeClient
    from common.config import NodeConfig, RunConfig
    from common.engines import ENGINE_KINDS

    peaks: dict[str, float] = {}
    _phase(peaks, "imports")
    torch.set_num_threads(setup["threads"])
    board = EdgeClient(RunConfig.from_flower(setup["run_config"]), NodeConfig.from_flower(setup["node_config"]))
    instructions = Instructions.from_record(setup["instructions"])
    head = {name: torch.zeros(shape).numpy() for name, shape in setup["head_shapes"].items()}
    if setup["receive"]:
        state = torch.load(setup["backbone"], weights_only=True)
        _reset_peak()
        board.receive_backbone(ENGINE_KINDS["torch"].pack(state), instructions)
        del state
        _phase(peaks, "receive backbone")
    _reset_peak()
    started = time.perf_counter()
    embedded = board.embedded(instructions)
    _phase(peaks, "embed")
    peaks["embed seconds"] = time.perf_counter() - started
    peaks["images"] = len(embedded.train_y) + len(embedded.test_y)
    peaks["computed"] = embedded.stats.computed
    _reset_peak()
    board.train(head, instructions)
    _phase(peaks, "train")
    return peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", type=int, default=3, help="ELPV client share split over this many boards")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the client process")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    import torch

    # Imported here, not at the top: the client processes import only what a ClientApp imports.
    from client.local_data import load_local_data
    from common.config import NodeConfig, RunConfig
    from server.run import ServerRun
    from simulations.benchmark import markdown_table, update_section

    with tempfile.TemporaryDirectory(prefix="edgesplit-memory-") as tmp:
        run_config = {
            "partitioner": "iid",
            "engine": "torch",
            "cache-dir": str(Path(tmp) / "server"),
            "runs-dir": str(Path(tmp) / "runs"),
        }
        run = ServerRun.prepare(RunConfig.from_flower(run_config))  # the server's instructions and backbone
        run.run_log.close()
        torch.save(run.backbone_state, Path(tmp) / "backbone.pt")
        # The board's images as an ImageFolder, read the way a deployed board reads its data-dir.
        board_data = Path(tmp) / "board-data"
        local = load_local_data(RunConfig.from_flower(run_config), NodeConfig(0, args.partitions))
        class_folders = [name.replace("/", "_") for name in run.classes]
        for files in (local.train, local.test):
            for path, label in zip(files.paths, files.labels, strict=True):
                (board_data / class_folders[label]).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, board_data / class_folders[label] / Path(path).name)
        board_config = {
            "dataset": "folder",
            "class-names": ",".join(class_folders),
            "server-test-dir": str(board_data),  # required by the schema; the client never reads it
            "engine": "torch",
        }
        setup = {
            "run_config": board_config,
            "node_config": {"data-dir": str(board_data)},
            # The torch engine: this benchmark measures PyTorch's memory on a board; the ONNX
            # engines' footprint is in the engines benchmark.
            "instructions": dataclasses.replace(
                run.instructions(1), engine="torch", engine_fingerprint=run.fingerprint
            ).to_record(),
            "head_shapes": {name: list(shape) for name, shape in run.head_shapes().items()},
            "backbone": str(Path(tmp) / "backbone.pt"),
            "threads": args.threads,
        }
        results = {}
        for batch in (8, 32):  # 8 is the default
            cache = str(Path(tmp) / f"board-batch{batch}")
            cold = {**setup, "receive": True, "node_config": {**setup["node_config"], "cache-dir": cache}}
            cold["run_config"] = {**board_config, "embed-batch-size": batch}
            results[batch] = run_child("simulations.edge_memory", cold)
        warm_cache = str(Path(tmp) / "board-batch8")  # round 1 left the backbone and embeddings here
        later = {**setup, "receive": False, "node_config": {**setup["node_config"], "cache-dir": warm_cache}}
        later_round = run_child("simulations.edge_memory", later)

    default, large = results[8], results[32]
    images = int(default["images"])

    def mib(result: dict[str, float], phase: str) -> str:
        return f"{result[phase]:.0f} MiB ({result[phase + ' file-backed']:.0f} file-backed)"

    def speed(result: dict[str, float]) -> str:
        return f"{result['computed'] / result['embed seconds']:.1f} img/s"

    rows = [
        ("imports (client.app: torch, flwr)", mib(default, "imports")),
        ("receive, verify and store the backbone", mib(default, "receive backbone")),
        (f"embed {images} images, batch 8 (default)", mib(default, "embed")),
        ("train the head, 5 local epochs (after embedding)", mib(default, "train")),
        ("later round in a new process: read cache + train", mib(later_round, "train")),
        (f"embed {images} images, batch 32", mib(large, "embed")),
        ("embedding throughput, batch 8 / batch 32", f"{speed(default)} / {speed(large)}"),
    ]
    peak = max(default[phase] for phase in ("receive backbone", "embed", "train"))
    large_peak = max(large[phase] for phase in ("receive backbone", "embed", "train"))

    def fits(mib: float) -> str:
        boards = [board for board, usable in USABLE_MIB.items() if mib <= usable]
        return ", ".join(boards) if boards else "none of the listed sizes"

    table = markdown_table(rows, ("phase (peak RSS of the client process)", "value"))
    print(table)
    machine = f"{platform.machine()}, {args.threads} torch threads, torch {torch.__version__}"
    body = (
        f"Command: `{COMMAND}`. Machine: {machine}. One board holding ELPV partition 0 of "
        f"{args.partitions} (IID; {images} images, 224 px) as an ImageFolder, EfficientNet-Lite0, linear head.\n"
        "Each scenario is a fresh process; a phase's figure is the process's peak during that phase.\n"
        "File-backed pages are mapped shared libraries; this machine's torch is the CUDA build, whose\n"
        "libraries account for most of them; a CPU-only aarch64 torch has none of those (not measured on a board).\n\n"
        f"{table}\n\n"
        f"Highest peak: {peak:.0f} MiB with the default embed-batch-size 8 (fits {fits(peak)}); "
        f"{large_peak:.0f} MiB with 32 (fits {fits(large_peak)}). "
        "Memory assumed free for the client after a lite 64-bit OS: "
        + ", ".join(f"{size} board: {usable} MiB" for size, usable in USABLE_MIB.items())
        + f". `embed-batch-size` defaults to 8: on a few cores it is no slower (throughput row) and its "
        f"peak is {large_peak - peak:.0f} MiB lower. The SuperNode process runs beside the ClientApp "
        "and needs memory too.\n"
    )
    update_section(args.output, TITLE, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
