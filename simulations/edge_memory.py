"""Peak memory of one edge client process, phase by phase, and how long a message takes to start:
what a board must have free, with the torch head (before issue 17) and the NumPy head (after).

    python -m simulations.edge_memory            # about 13 minutes on 2 shared cores

Each scenario runs in a fresh Python process that imports what a deployed ClientApp imports
(``client.app``). The peak (VmHWM) is reset before each phase (``/proc/self/clear_refs``), so a
phase's figure is the process's high-water mark during that phase. Scenarios: round 1 (receive
and store the backbone, embed the board's images in the run's views, train the head) and a later
round in a new process (a deployed SuperNode starts one ClientApp process per message; the
embeddings come from the cache and the backbone is not even loaded). Engine: the default
(``auto``: int8 ONNX Runtime), views: ELPV's default (the eight dihedral ones).

"before" is the client as it was: torch imported with the ClientApp and the head trained in torch;
"after" is the NumPy head, torch never imported at ``cut`` 0. At ``cut`` 1 the backbone's last
stage trains in torch either way; "after" imports torch only when the head is built.

Start-up: wall time from starting a ClientApp process to the first line of its train handler
(Flower starts one per message on a board), median of three, both variants in this command.
Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deploy.local_simulation import PROJECT_ROOT, run_child

COMMAND = "python -m simulations.edge_memory"
TITLE = "Edge client memory and message start-up: peak RSS of one client process"
# Memory left for the client on a board of each size, after a lite 64-bit OS (Raspberry Pi OS Lite, L4T).
USABLE_MIB = {"512 MB": 300, "1 GB": 700, "2 GB": 1600, "4 GB": 3400}
PHASES = ("imports", "receive backbone", "embed", "train")
MODES = ("before", "after")


def _phase(peaks: dict[str, float], name: str) -> None:
    peaks[name] = _status("VmHWM")


def _status(field: str) -> float:
    """A /proc/self/status field in MiB (Linux)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def _use_torch_head() -> None:
    """The client as it was before: torch imported with the ClientApp, the head a torch module."""
    import torch  # noqa: F401  (the import itself is what is measured)

    import client.edge_client
    from common.heads import TorchHead
    from common.protocol import Instructions
    from common.split import build_head

    def torch_head_for(ins: Instructions) -> TorchHead:
        return TorchHead(build_head(ins.backbone_name, ins.cut, ins.head, ins.num_classes, ins.mlp_hidden))

    client.edge_client.trainable_of = torch_head_for  # type: ignore[assignment]


def child(setup: dict[str, Any]) -> dict[str, float]:
    """One client process: runs the phases ``setup`` names and returns each phase's peak RSS."""
    if setup["mode"] == "before":
        _use_torch_head()
    import numpy as np

    import client.app  # noqa: F401  (what Flower imports in a ClientApp process)
    from client.edge_client import EdgeClient
    from common.config import NodeConfig, RunConfig
    from common.engines import ENGINE_KINDS
    from common.protocol import Instructions

    peaks: dict[str, float] = {}
    _phase(peaks, "imports")
    board = EdgeClient(RunConfig.from_flower(setup["run_config"]), NodeConfig.from_flower(setup["node_config"]))
    instructions = Instructions.from_record(setup["instructions"])
    head = dict(np.load(setup["head"]))
    if setup["receive"]:
        artifact = Path(setup["backbone"]).read_bytes()
        _reset_peak()
        board.receive_backbone(ENGINE_KINDS[instructions.engine].pack(artifact), instructions)
        del artifact
        _phase(peaks, "receive backbone")
    _reset_peak()
    started = time.perf_counter()
    embedded = board.embedded(instructions)
    _phase(peaks, "embed")
    peaks["embed seconds"] = time.perf_counter() - started
    peaks["images"] = len(embedded.train_y) + len(embedded.test_y)
    _reset_peak()
    board.train(head, instructions)
    _phase(peaks, "train")
    peaks["torch imported"] = float("torch" in sys.modules)
    return peaks


# A ClientApp process up to the first line of its train handler, then out (argv: mode, setup JSON).
STARTUP_SCRIPT = """
import json, sys, time
mode, setup = sys.argv[1], json.loads(sys.argv[2])
if mode == "before":
    from simulations.edge_memory import _use_torch_head
    _use_torch_head()
import numpy as np
import client.app as client_app
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from common.flower_glue import act_as, to_array_record
from common.protocol import ARRAYS, CONFIG

def first_line(context):
    print(json.dumps({"reached": time.time()}), flush=True)
    raise SystemExit(0)

client_app._client = first_line  # the handler's first line is `client = _client(context)`
act_as(1)
head = dict(np.load(setup["head"]))
content = RecordDict({CONFIG: ConfigRecord(setup["instructions"]), ARRAYS: to_array_record(head)})
message = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
configs = {"run_config": setup["run_config"], "node_config": setup["node_config"]}
client_app.app(message, Context(run_id=1, node_id=1, state=RecordDict(), **configs))
"""


def startup_seconds(mode: str, setup: dict[str, Any], repeats: int = 3) -> float:
    """Median wall time from starting a ClientApp process to the first line of its handler."""
    times = []
    for _ in range(repeats):
        started = time.time()
        result = subprocess.run(
            [sys.executable, "-c", STARTUP_SCRIPT, mode, json.dumps(setup)],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"start-up probe failed:\n{result.stderr[-3000:]}")
        times.append(json.loads(result.stdout.strip().splitlines()[-1])["reached"] - started)
    return statistics.median(times)


def board_setup(tmp: Path, cut: int, partitions: int) -> dict[str, Any]:
    """The server's side for one cut: its instructions, int8 backbone and initial head, and the
    board's images (ELPV partition 0) as an ImageFolder, read the way a deployed board reads its data-dir."""
    import numpy as np

    from client.local_data import load_local_data
    from common.config import NodeConfig, RunConfig
    from server.server_run import ServerRun

    run_config = {
        "partitioner": "iid",
        "cut": cut,
        "cache-dir": str(tmp / "server"),
        "runs-dir": str(tmp / "runs"),
    }
    run = ServerRun.prepare(RunConfig.from_flower(run_config))
    run.run_log.close()
    instructions = run.instructions(1)
    (tmp / f"backbone-cut{cut}.onnx").write_bytes(run.variants.artifact(instructions.engine))
    np.savez(tmp / f"head-cut{cut}.npz", **run.initial_head())  # type: ignore[arg-type]  # numpy's stub
    board_data = tmp / "board-data"
    class_folders = [name.replace("/", "_") for name in run.classes]
    if not board_data.exists():
        local = load_local_data(RunConfig.from_flower(run_config), NodeConfig(0, partitions))
        for files in (local.train, local.test):
            for path, label in zip(files.paths, files.labels, strict=True):
                (board_data / class_folders[label]).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, board_data / class_folders[label] / Path(path).name)
    return {
        "run_config": {
            "dataset": "folder",
            "class-names": ",".join(class_folders),
            "server-test-dir": str(board_data),  # required by the schema; the client never reads it
            "views": "dihedral",  # ELPV's default
            "cut": cut,
        },
        "node_config": {"data-dir": str(board_data)},
        "instructions": instructions.to_record(),
        "head": str(tmp / f"head-cut{cut}.npz"),
        "backbone": str(tmp / f"backbone-cut{cut}.onnx"),
    }


def measure(tmp: Path, setup: dict[str, Any], cut: int) -> dict[str, dict[str, float]]:
    """Round 1 and a later round of one board, in fresh processes, for each mode."""
    results = {}
    for mode in MODES:
        cache = str(tmp / f"board-cut{cut}-{mode}")
        node = {**setup["node_config"], "cache-dir": cache}
        first = run_child("simulations.edge_memory", {**setup, "mode": mode, "receive": True, "node_config": node})
        later = run_child("simulations.edge_memory", {**setup, "mode": mode, "receive": False, "node_config": node})
        results[mode] = {**first, "later round": max(later["embed"], later["train"])}
    return results


def table(results: dict[str, dict[str, float]], cut: int) -> str:
    from simulations.benchmark import markdown_table

    images = int(results["after"]["images"])
    labels = {
        "imports": "imports (client.app)",
        "receive backbone": "receive, verify and store the int8 backbone",
        "embed": f"embed {images} images x 8 views (int8 ONNX Runtime)",
        "train": "train the head, 5 local epochs",
        "later round": "later round, new process: read cache + train",
    }
    rows = [(label, *(f"{results[mode][phase]:.0f} MiB" for mode in MODES)) for phase, label in labels.items()]
    rows.append(("highest phase", *(f"{max(results[m][p] for p in labels):.0f} MiB" for m in MODES)))
    rows.append(("torch imported", *("yes" if results[m]["torch imported"] else "no" for m in MODES)))
    columns = (
        ("before: torch head", "after: NumPy head")
        if cut == 0
        else ("before: torch imported at start", "after: torch imported for the tail")
    )
    return markdown_table(rows, ("phase (peak RSS of the client process)", *columns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", type=int, default=3, help="ELPV client share split over this many boards")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    tables, startup = {}, {}
    with tempfile.TemporaryDirectory(prefix="edgesplit-memory-") as tmp:
        for cut in (0, 1):
            setup = board_setup(Path(tmp), cut, args.partitions)
            if cut == 0:
                startup = {mode: startup_seconds(mode, setup) for mode in MODES}
                startup["load"] = os.getloadavg()[0]
            tables[cut] = measure(Path(tmp), setup, cut)
            print(f"cut={cut}\n{table(tables[cut], cut)}\n", flush=True)
    body = report(tables, startup, args.partitions)
    print(body)
    from simulations.benchmark import update_section

    update_section(args.output, TITLE, body)
    return 0


def report(tables: dict[int, dict[str, dict[str, float]]], startup: dict[str, float], partitions: int) -> str:
    import onnxruntime

    def fits(mib: float) -> str:
        boards = [board for board, usable in USABLE_MIB.items() if mib <= usable]
        return ", ".join(boards) if boards else "none of the listed sizes"

    peak = {cut: max(tables[cut]["after"][p] for p in (*PHASES, "later round")) for cut in tables}
    images = int(tables[0]["after"]["images"])
    machine = (
        f"{platform.machine()}, {_cpu()}; Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"
    )
    return (
        f"Command: `{COMMAND}`. Machine: {machine}. One board holding ELPV partition 0 of {partitions} "
        f"(IID; {images} images, 224 px) as an ImageFolder, EfficientNet-Lite0, linear head, the default "
        "engine (int8 ONNX Runtime) and views (8). Each scenario is a fresh process; a phase's figure is the "
        "process's peak during that phase. Before: torch imported with the ClientApp and the torch head (the "
        "client as it was); after: the NumPy head, torch not imported at cut 0.\n\n"
        f"Head only (cut 0):\n\n{table(tables[0], 0)}\n\n"
        f"Last stage trains too (cut 1: 7x7x320 feature maps cached, the tail trains in torch):\n\n"
        f"{table(tables[1], 1)}\n\n"
        f"Highest peak after: {peak[0]:.0f} MiB at cut 0 (fits {fits(peak[0])}), {peak[1]:.0f} MiB at cut 1 "
        f"(fits {fits(peak[1])}). Memory assumed free for the client after a lite 64-bit OS: "
        + ", ".join(f"{size} board: {usable} MiB" for size, usable in USABLE_MIB.items())
        + ". The SuperNode process runs beside the ClientApp and needs memory too.\n\n"
        "Message start-up (head only): process start to the first line of the train handler, median of 3: "
        f"before {startup['before']:.2f} s, after {startup['after']:.2f} s "
        f"({startup['before'] / startup['after']:.1f}x faster; load average {startup['load']:.1f} on this "
        "shared machine while measuring).\n"
    )


def _cpu() -> str:
    """The CPU model, its widest vector extension we care about, and the core count."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.MULTILINE)
    vnni = flags is not None and "avx512_vnni" in flags.group(1).split()
    return f"{model.group(1) if model else 'unknown CPU'}{', AVX-512 VNNI' if vnni else ''}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
