"""End to end through the real Flower runtime: flower-superlink in simulation mode, `flwr run`,
the ServerApp and ClientApps in their own processes. Small: 3 clients, a few hundred images,
2 rounds. The runs are shared by the tests of this module (module-scoped fixtures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.privacy import AUDIT_LOG_ENV
from common.heads import head_arrays, make_head
from simulations.federation import flwr_run
from tests.conftest import with_server_engines, write_image_folder

pytestmark = pytest.mark.flower

HEAD_SHAPES = {"classifier.weight": [4, 1280], "classifier.bias": [4]}
SMALL_RUN = {"subset": 240, "num-server-rounds": 2, "local-epochs": 2, "views": "none"}


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def _run(
    tmp: Path, name: str, cache: Path, engines: Path, extra: dict[str, Any] | None = None, clients: int = 3
) -> dict[str, Any]:
    with_server_engines(cache, engines)
    audit = tmp / f"{name}-audit.jsonl"
    config = {**SMALL_RUN, "cache-dir": str(cache), "runs-dir": str(tmp / "runs"), "run-name": name, **(extra or {})}
    result = flwr_run(config, clients, tmp / "flwr-home", env={AUDIT_LOG_ENV: str(audit)}, timeout=600)
    run_dir = tmp / "runs" / name
    assert result.returncode == 0, result.stdout[-4000:]
    assert (run_dir / "summary.json").is_file(), result.stdout[-4000:]
    return {
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "events": _events(run_dir),
        "audit": [json.loads(line) for line in audit.read_text().splitlines()],
        "output": result.stdout,
        "run_dir": run_dir,
    }


@pytest.fixture(scope="module")
def elpv_runs(tmp_path_factory: pytest.TempPathFactory, server_engines: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same small ELPV run twice with one cache: the second must find everything cached.
    ELPV's default views (the eight flips and rotations) are embedded once, in the first run."""
    tmp = tmp_path_factory.mktemp("elpv")
    first = _run(tmp, "first", tmp / "cache", server_engines, extra={"views": "auto"})
    second = _run(tmp, "second", tmp / "cache", server_engines, extra={"views": "auto"})
    return first, second


def test_run_writes_the_documented_artifacts(elpv_runs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    first, _ = elpv_runs
    summary = first["summary"]
    for name in ("config.json", "events.jsonl", "summary.json", "head.npz", "head.json"):
        assert (first["run_dir"] / name).is_file(), name
    for name in ("model.json", "model.onnx", "model-int8.onnx", "model.ts"):  # the deployable model
        assert (first["run_dir"] / "model" / name).is_file(), name
    for name in ("report.html", "report-metrics.png", "report-traffic.png", "report-confusion.png"):
        assert (first["run_dir"] / name).is_file(), name
    assert list((first["run_dir"] / "tensorboard").glob("events.out.tfevents.*"))
    final = summary["final"]
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "confusion_matrix"):
        assert key in final
    matrix = np.asarray(final["confusion_matrix"])
    assert matrix.shape == (4, 4)
    assert matrix.sum() == final["test_examples"] == 60  # 25% of the 240-image subset
    assert final["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for record in summary["rounds"]:
        for key in (
            "accuracy",
            "macro_f1",
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
    head = np.load(first["run_dir"] / "head.npz")
    assert {k: list(head[k].shape) for k in head.files} == HEAD_SHAPES
    # progress: one line per round and embedding progress from the clients
    assert "round   1/2 | accuracy" in first["output"] and "round   2/2 | accuracy" in first["output"]
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
    assert first["summary"]["embedding"]["computed"] == 240
    assert first["summary"]["embedding"]["cached"] == 0
    assert second["summary"]["embedding"]["computed"] == 0
    assert second["summary"]["embedding"]["cached"] == 240
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
            allowed = {"fingerprint", "engine", "engine-fingerprint", "held-fingerprint", "data-notes"}
            assert key in allowed and isinstance(value, str)
        if reply["message_type"] == "train":
            arrays = reply["arrays"]
            assert set(arrays) == {"arrays"}
            assert {name: shape for name, (shape, _) in arrays["arrays"].items()} == HEAD_SHAPES
        else:
            assert reply["arrays"] == {}


def test_user_folders_and_a_client_without_data(tmp_path: Path, server_engines: Path) -> None:
    """ImageFolder data per client; one client's folder is missing, one has an unknown class and
    a corrupt image, one odd files. The federation goes on with the others and the log says why."""
    data = tmp_path / "data"
    write_image_folder(data / "client-0", {"ok": 6, "crack": 6}, seed=0)
    write_image_folder(data / "client-1", {"ok": 5, "crack": 4, "smudge": 3}, seed=1)
    (data / "client-1" / "crack" / "broken.png").write_bytes(b"not a png at all")
    # More that a board's folder may hold: an empty file, a note, a link out of the data folder.
    (data / "client-0" / "ok" / "empty.png").write_bytes(b"")
    (data / "client-0" / "ok" / "notes.txt").write_text("calibrated on Tuesday")
    (tmp_path / "private.png").write_bytes((data / "client-0" / "ok" / "0.png").read_bytes())
    (data / "client-0" / "crack" / "link.png").symlink_to(tmp_path / "private.png")
    write_image_folder(tmp_path / "server-test", {"ok": 4, "crack": 4}, seed=2)
    # client-2 has no folder at all
    run = _run(
        tmp_path,
        "folders",
        tmp_path / "cache",
        server_engines,
        extra={
            "subset": 0,
            "dataset": "folder",
            "class-names": "ok,crack",
            "data-dir": str(data),
            "server-test-dir": str(tmp_path / "server-test"),
            "image-size": 64,
            "min-clients": 2,
            "export-model": False,
        },
    )
    summary, events = run["summary"], run["events"]
    assert [(r["clients_ok"], r["clients_failed"]) for r in summary["rounds"]] == [(2, 1), (2, 1)]
    failures = [e for e in events if e["event"] == "client-failed" and e["phase"] == "train"]
    assert len(failures) == 2 and all("client-2" in e["reason"] for e in failures)
    notes = [e.get("notes", "") for e in events if e["event"] == "client-reply"]
    assert any("smudge" in note for note in notes)
    assert summary["embedding"]["skipped"] == 4  # corrupt, empty, not an image, link out: counted once
    assert summary["classes"] == ["ok", "crack"]
    assert np.asarray(summary["final"]["confusion_matrix"]).sum() == 8


@pytest.mark.parametrize(
    ("extra", "head_shapes", "classes"),
    [
        (
            {"strategy": "fedprox", "head": "mlp", "mlp-hidden": 16, "partitioner": "iid", "engine": "torch"},
            {
                "classifier.0.weight": [16, 1280],
                "classifier.0.bias": [16],
                "classifier.3.weight": [4, 16],
                "classifier.3.bias": [4],
            },
            ["p0", "p1/3", "p2/3", "p1"],
        ),
        (
            {"strategy": "fedadam", "elpv-task": "binary", "partitioner": "pathological", "classes-per-client": 1},
            {"classifier.weight": [2, 1280], "classifier.bias": [2]},
            ["functional", "defective"],
        ),
    ],
    ids=["fedprox-mlp-iid", "fedadam-binary-pathological"],
)
def test_other_strategies_heads_and_tasks(
    tmp_path: Path, server_engines: Path, extra: dict[str, Any], head_shapes: dict[str, list[int]], classes: list[str]
) -> None:
    run = _run(tmp_path, "variant", tmp_path / "cache", server_engines, extra={**extra, "export-model": False})
    summary = run["summary"]
    engines = {e["engine"] for e in run["events"] if e["event"] == "client-reply"}
    assert engines == {extra.get("engine", "onnx-int8")}
    assert summary["classes"] == classes
    assert [(r["clients_ok"], r["clients_failed"], r["clients_rejected"]) for r in summary["rounds"]] == [(3, 0, 0)] * 2
    head = np.load(run["run_dir"] / "head.npz")
    assert {k: list(head[k].shape) for k in head.files} == head_shapes
    # the aggregated head moved away from the seeded initial head the server started from
    initial = head_arrays(
        make_head(extra.get("head", "linear"), 1280, len(classes), extra.get("mlp-hidden", 256), seed=42)
    )
    assert any(not np.allclose(head[name], initial[name]) for name in initial)


def test_later_cut_fedncm_and_personal_heads(tmp_path: Path, server_engines: Path) -> None:
    """cut=1: the backbone's last stage trains on the devices and travels with the head; FedNCM
    initialises the head from the clients' class sums; clients score personal heads too; and the
    exported model (int8 backbone up to the cut, then the trained tail and head) reproduces the
    server's view-averaged accuracy on its held-out images."""
    from client.predict import Classifier
    from common.config import RunConfig
    from server.run import server_test_files

    extra = {"cut": 1, "head-init": "ncm", "ncm-min-examples": 2, "personal-epochs": 3, "views": "flips"}
    run = _run(tmp_path, "cut", tmp_path / "cache", server_engines, extra=extra)
    summary, events = run["summary"], run["events"]
    trainable = {
        "tail.0.0.weight": [1280, 320, 1, 1],  # conv_head
        "tail.0.1.scale": [1280],  # its batch norm, statistics folded in
        "tail.0.1.shift": [1280],
        **HEAD_SHAPES,
    }
    head = np.load(run["run_dir"] / "head.npz")
    assert {k: list(head[k].shape) for k in head.files} == trainable
    # every train reply carries exactly the trainable part; FedNCM's replies only class statistics
    for reply in run["audit"]:
        if reply["message_type"] == "train":
            assert {n: list(s) for n, (s, _) in reply["arrays"]["arrays"].items()} == trainable
    stats = [r["arrays"] for r in run["audit"] if r["message_type"] == "query" and r["arrays"]]
    assert len(stats) == 3
    assert all(
        {n: list(s) for n, (s, _) in a["class-stats"].items()} == {"sums": [4, 1280], "counts": [4]} for a in stats
    )
    init = [e for e in events if e["event"] == "head-initialised"]
    assert len(init) == 1 and init[0]["nodes"] == 3 and init[0]["classes_set"]
    assert sum(init[0]["class_counts"]) > 0 and summary["head_init"]["method"] == "ncm"
    assert init[0]["backbones_sent"] == 3  # the backbone up to the cut went with FedNCM's query
    for record in summary["rounds"]:
        assert record["clients_ok"] == 3 and record["backbones_sent"] == 0
        assert record["max_bytes_up_per_client"] > 1280 * 320 * 4  # the tail travels
        assert 0 <= record["client_personal_accuracy"] <= 1
    # the deployable model computes what the server evaluated
    info = json.loads((run["run_dir"] / "model" / "model.json").read_text())
    assert info["cut"] == 1 and info["feature_shape"] == [320, 7, 7] and len(info["views"]) == 4
    config = RunConfig.from_flower({**SMALL_RUN, **extra})
    test_files = server_test_files(config)
    classifier = Classifier(run["run_dir"] / "model", int8=True)
    predictions = list(classifier.predict(list(zip(test_files.paths, test_files.labels, strict=True))))
    accuracy = np.mean([p.predicted == p.label for p in predictions])
    assert accuracy == pytest.approx(summary["final"]["accuracy"], abs=2 / len(predictions))
