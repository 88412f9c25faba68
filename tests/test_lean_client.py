"""A head-only board's ClientApp process never imports torch: Flower's ClientApp is called on a
real train message in a fresh process (as a SuperNode starts one per message), and afterwards
neither torch nor torchvision nor timm is in ``sys.modules``. A board without torch asked for a
later cut answers with an error that names the extra to install, and the `edge` install profile
does not install torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common import protocol
from common.backbones import fingerprint, load_backbone_weights, preprocess_for
from common.trainable import make_trainable
from server.variants import BackboneVariants
from tests.conftest import REPO_ROOT, write_image_folder
from tests.protocol_samples import instructions

HEAVY = ["torch", "torchvision", "timm"]

# Runs in a clean interpreter: Flower's ClientApp on one train message, as a SuperNode's
# per-message process does. argv: the set-up (JSON), then the packages made unimportable.
CLIENTAPP_SCRIPT = """
import json, sys
setup, blocked = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in blocked:  # None in sys.modules: `import` fails and find_spec says "not installed"
    sys.modules[name] = None
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from client.app import app
from common.engines import ENGINE_KINDS
from common.flower_glue import act_as, from_array_record, to_array_record
from common.protocol import ARRAYS, BACKBONE, CONFIG, METRICS

act_as(1)
head = dict(np.load(setup["head"]))
content = RecordDict({CONFIG: ConfigRecord(setup["instructions"]), ARRAYS: to_array_record(head)})
if setup["backbone"]:
    model = open(setup["backbone"], "rb").read()
    content[BACKBONE] = to_array_record(ENGINE_KINDS[setup["engine"]].pack(model))
message = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
configs = {"node_config": setup["node_config"], "run_config": setup["run_config"]}
context = Context(run_id=1, node_id=1, state=RecordDict(), **configs)
try:
    reply = app(message, context)
    outcome = {"metrics": dict(reply.content[METRICS]), "arrays": sorted(from_array_record(reply.content[ARRAYS]))}
except Exception as error:  # Flower's runner makes this an error reply with this reason
    outcome = {"error": type(error).__name__ + ": " + str(error)}
heavy = [name for name in ("torch", "torchvision", "timm") if sys.modules.get(name) is not None]
print(json.dumps({**outcome, "heavy_imported": heavy}))
"""


def _run_clientapp(setup: dict[str, Any], blocked: list[str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", CLIENTAPP_SCRIPT, json.dumps(setup), json.dumps(blocked)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _setup(tmp_path: Path, cut: int, backbone: Path | None, **overrides: Any) -> dict[str, Any]:
    write_image_folder(tmp_path / "board", {"ok": 5, "crack": 5}, seed=0)
    head = make_trainable("efficientnet_lite0", 0, "mlp", 2, hidden=8, seed=0).arrays() if cut == 0 else {}
    np.savez(tmp_path / "head.npz", **head)
    return {
        "run_config": {  # the run the board agreed to: what the instructions say (client/agreement.py)
            "dataset": "folder",
            "class-names": "ok,crack",
            "server-test-dir": str(tmp_path),
            "cut": cut,
            "head": "mlp",
            "mlp-hidden": 8,
            "ncm-min-examples": 2,
        },
        "node_config": {"data-dir": str(tmp_path / "board"), "cache-dir": str(tmp_path / "cache")},
        "head": str(tmp_path / "head.npz"),
        "backbone": str(backbone) if backbone else "",
        "engine": "onnx",
        "instructions": instructions(cut=cut, head="mlp", **overrides).to_record(),
    }


def test_a_head_only_clientapp_process_trains_without_importing_torch(tmp_path: Path, server_engines: Path) -> None:
    # Prepare (here, with torch): the server's fp32 ONNX backbone, as it ships it to a board (the
    # session's shared variants folder: other tests export the same one)
    preprocess = preprocess_for("efficientnet_lite0", 224, 1.0)
    state = load_backbone_weights("efficientnet_lite0")
    backbone_fp = fingerprint("efficientnet_lite0", state, preprocess)
    variants = BackboneVariants(
        server_engines, "efficientnet_lite0", state, preprocess, backbone_fp, calibration=lambda: np.zeros(0)
    )
    (tmp_path / "backbone.onnx").write_bytes(variants.artifact("onnx"))
    setup = _setup(
        tmp_path,
        0,
        tmp_path / "backbone.onnx",
        fingerprint=backbone_fp,
        preprocess=preprocess,
        engine="onnx",
        engine_fingerprint=variants.variant_fingerprint("onnx"),
        views=("identity", "hflip"),
        local_epochs=2,
        proximal_mu=0.01,
    )

    # Execute: torch is installed in that interpreter, nothing is blocked
    outcome = _run_clientapp(setup, blocked=[])

    # Assert
    assert "error" not in outcome, outcome
    assert outcome["heavy_imported"] == []
    assert outcome["arrays"] == sorted(make_trainable("efficientnet_lite0", 0, "mlp", 2, hidden=8).shapes())
    metrics = outcome["metrics"]
    assert metrics[protocol.EMBEDDINGS_COMPUTED] == 10 and metrics[protocol.NUM_EXAMPLES] == 8
    assert np.isfinite(metrics[protocol.TRAIN_LOSS]) and metrics[protocol.BACKBONE_RECEIVED] == 1


@pytest.mark.parametrize(
    ("cut", "engine", "refusal"),
    [(1, "auto", "MissingExtra: cut=1"), (0, "torch", "EngineError: engine='torch' needs torch")],
)
def test_a_board_without_torch_asked_for_torch_work_names_the_extra(
    tmp_path: Path, cut: int, engine: str, refusal: str
) -> None:
    """A later cut (the tail trains in torch) or the torch engine, on a board with the `edge`
    profile only: the message is refused before any embedding, with the extra to install.
    (Flower's runner turns the exception into an error reply; the server counts the node as
    failed, with this reason in events.jsonl, and the round goes on with the others.)"""
    # Prepare: no backbone needed, the board refuses first
    setup = _setup(tmp_path, cut, None)
    setup["run_config"]["engine"] = engine

    # Execute
    outcome = _run_clientapp(setup, blocked=HEAVY)

    # Assert
    assert outcome["error"].startswith(refusal)
    assert "pip install 'edgesplit[edge,torch]'" in outcome["error"]
    assert outcome["heavy_imported"] == []


def test_the_edge_install_profile_has_no_torch() -> None:
    """pyproject.toml: the base install plus the `edge` extra name no torch, torchvision or timm
    (pip resolves exactly these and their own dependencies, none of which is torch), while the
    `torch` extra and the server's do."""
    import re
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower() for requirement in requirements}

    assert not names(project["dependencies"] + extras["edge"]) & set(HEAVY)
    assert names(extras["torch"]) >= set(HEAVY)
    assert "edgesplit[edge,torch]" in extras["server"]
