"""End to end through the real Flower runtime: flower-superlink in simulation mode, `flwr run`,
the ServerApp and ClientApps in their own processes. Small: 3 clients, a few hundred images,
2 rounds. The runs are shared by the tests of this module (module-scoped fixtures); the second,
which checks what the first left in the nodes' caches, runs in process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.flower_runs import HEAD_SHAPES, run_in_process, run_small

pytestmark = pytest.mark.flower


@pytest.fixture(scope="module")
def elpv_runs(tmp_path_factory: pytest.TempPathFactory, server_engines: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same small ELPV run twice with one cache: the second must find everything cached.
    Two views (the image and its mirror), embedded once, in the first run: what holds for them
    holds for ELPV's eight (`views='auto'`, test_config.py) at a quarter of the embedding.
    The second run is the real ServerApp and ClientApp in this process (tests/flower_runs.py),
    which has held no client of this cache: what it finds cached, it finds on disk."""
    tmp = tmp_path_factory.mktemp("elpv")
    first = run_small(tmp, "first", tmp / "cache", server_engines, extra={"views": "hflip"})
    second = run_in_process(
        tmp, "second", tmp / "cache", server_engines, extra={"views": "hflip", "export-model": False}
    )
    return first, second


def test_run_writes_the_documented_artifacts(elpv_runs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    first, _ = elpv_runs
    summary = first["summary"]
    for name in ("config.json", "events.jsonl", "summary.json", "head.npz", "head.json"):
        assert (first["run_dir"] / name).is_file(), name
    for name in ("model.json", "model.onnx", "model-int8.onnx", "model.ts"):  # the deployable model
        assert (first["run_dir"] / "model" / name).is_file(), name
    for name in (
        "report.html",
        "report-metrics.png",
        "report-traffic.png",
        "report-confusion.png",
        "report-precision-recall.png",
    ):
        assert (first["run_dir"] / name).is_file(), name
    assert list((first["run_dir"] / "tensorboard").glob("events.out.tfevents.*"))
    final = summary["final"]
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "balanced_accuracy", "confusion_matrix"):
        assert key in final
    assert len(final["per_class_recall"]) == 4
    matrix = np.asarray(final["confusion_matrix"])
    # ELPV's inspection question: defective or not, its recall at the chosen precision
    (point,) = summary["operating_points"]
    assert point["name"] == "defective (not p0)" and point["target_precision"] == 0.9
    assert 0 <= point["recall"] <= 1 and point["positives"] == int(matrix[1:].sum())
    assert len(point["curve"]["precision"]) == len(point["curve"]["recall"]) > 1
    assert matrix.shape == (4, 4)
    assert matrix.sum() == final["test_examples"] == 40  # 25% of the 160-image subset
    assert final["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for record in summary["rounds"]:
        for key in (
            "accuracy",
            "macro_f1",
            "balanced_accuracy",
            "loss",
            "bytes_down",
            "bytes_up",
            "seconds",
            "clients_ok",
            "clients_failed",
        ):
            assert key in record
        assert record["clients_ok"] == 3 and record["clients_failed"] == 0
    assert summary["backbone"]["name"] == "efficientnet_lite0"
    assert summary["backbone"]["engine"] == "onnx-int8"  # "auto" where ONNX Runtime is installed
    assert len(summary["backbone"]["fingerprint"]) == 64
    assert summary["wall_seconds"] > 0
    # every node checked its int8 engine on the server's golden batch, and passed
    assert len(summary["nodes"]) == 3 and summary["golden_min_cosine"] == 0.98
    for node in summary["nodes"].values():
        assert node["engine"] == "onnx-int8" and node["golden_cosine"] > 0.98
        assert not node["refused"] and node["fallback"] == ""
    # the exported model, run as `edgesplit predict` runs it by default, scores what the run reported
    info = json.loads((first["run_dir"] / "model" / "model.json").read_text())
    assert info["trained_with"]["engine"] == "onnx-int8"
    check = summary["export_check"]
    assert check["form"] == "onnx-int8" and check["ok"] and abs(check["gap_points"]) <= 0.5
    head = np.load(first["run_dir"] / "head.npz")
    assert {k: list(head[k].shape) for k in head.files} == HEAD_SHAPES
    # progress: one line per round and embedding progress from the clients
    assert "round   1/2 | accuracy" in first["output"] and "round   2/2 | accuracy" in first["output"]
    assert "| balanced " in first["output"] and "| recall " in first["output"]
    assert "client 0: embedded" in first["output"]


def test_backbone_goes_once_per_node_then_only_the_head(elpv_runs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    first, second = elpv_runs
    sent = [e for e in first["events"] if e["event"] == "backbone-sent"]
    assert len(sent) == 3 and {e["round"] for e in sent} == {1}
    assert len({e["node"] for e in sent}) == 3
    round_1, round_2 = first["summary"]["rounds"]
    # the default engine on this machine is onnx-int8: three copies of the 3.9 MB int8 model
    assert {e["engine"] for e in sent} == {"onnx-int8"}
    assert round_1["bytes_down"] > 3 * 3_500_000
    assert round_2["bytes_down"] < 300_000  # heads and instructions only
    for record in first["summary"]["rounds"]:
        assert 0 < record["max_bytes_up_per_client"] <= 25_000
    # the second run's nodes hold the fingerprint on disk: nothing is sent again
    assert not [e for e in second["events"] if e["event"] == "backbone-sent"]
    assert second["summary"]["rounds"][0]["bytes_down"] < 300_000


def test_second_run_embeds_nothing(elpv_runs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    first, second = elpv_runs
    assert first["summary"]["embedding"]["computed"] == 160
    assert first["summary"]["embedding"]["cached"] == 0
    assert second["summary"]["embedding"]["computed"] == 0
    assert second["summary"]["embedding"]["cached"] == 160
    # same data, seed and cache: the same federated result
    assert second["summary"]["final"]["accuracy"] == pytest.approx(first["summary"]["final"]["accuracy"])


def test_every_reply_holds_only_head_arrays_and_numbers(elpv_runs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """The audit log is written by the ClientApp's outgoing mod: it sees every reply."""
    first, _ = elpv_runs
    replies = first["audit"]
    kinds = [r["message_type"] for r in replies]
    assert kinds.count("train") == 6 and kinds.count("evaluate") == 6 and kinds.count("query") == 3
    for reply in replies:
        # a query reply names the node's engine and held variant (status strings) and nothing else
        assert set(reply["metrics"]) == (set() if reply["message_type"] == "query" else {"metrics"})
        for value in reply["metrics"].get("metrics", {}).values():
            assert isinstance(value, int | float) and not isinstance(value, bool)
        assert set(reply["configs"]) <= {"status"}
        for key, value in reply["configs"].get("status", {}).items():
            allowed = {
                "fingerprint",
                "engine",
                "engine-fingerprint",
                "held-fingerprint",
                "data-notes",
                "fallback",
                "machine",
            }
            if key == "golden-cosine":  # the one number of a status: the engine's golden check
                assert isinstance(value, float)
            else:
                assert key in allowed and isinstance(value, str)
        if reply["message_type"] == "train":
            arrays = reply["arrays"]
            assert set(arrays) == {"arrays"}
            assert {name: shape for name, (shape, _) in arrays["arrays"].items()} == HEAD_SHAPES
        else:
            assert reply["arrays"] == {}


def test_the_staged_app_builds_the_same_fab_as_the_project() -> None:
    """`flwr run` builds from deploy.local_simulation.app_source()'s copy (Flower walks every file
    under the app folder, a project .venv included): the FAB must be the project's, byte for byte."""
    from common.flower_glue import build_fab
    from deploy.local_simulation import PROJECT_ROOT, app_source

    staged = app_source()
    assert staged != PROJECT_ROOT and (staged / "pyproject.toml").is_file()
    assert build_fab(staged) == build_fab(PROJECT_ROOT)
