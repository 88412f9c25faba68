"""What the default run does not exercise: user ImageFolders with missing and bad data with another
strategy, head and engine, and a later cut with FedNCM, personal heads and the exported model.
Through the real ServerApp and ClientApp, in this process (tests/flower_runs.py InProcessFlower):
none of it is the runtime's, and Flower's simulation runtime costs 40 s more per run here.
(test_flower_runtime.py runs the default ELPV run through the runtime.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.heads import head_arrays, make_head
from server.dp import epsilon_spent
from tests.conftest import write_image_folder
from tests.flower_runs import HEAD_SHAPES, SMALL_RUN, run_in_process

DP_CLIP = 0.05  # small enough to bind: the MLP head's updates here are larger


def test_user_folders_another_strategy_head_and_engine_and_a_client_without_data(
    tmp_path: Path, server_engines: Path
) -> None:
    """ImageFolder data per client; one client's folder is missing, one has an unknown class and
    a corrupt image, one odd files. The federation goes on with the others and the log says why.
    The run also changes what the default run does not: FedProx, the MLP head, the torch
    engine and differential privacy (clipped updates, noise, the budget in summary.json).
    (FedAdam and the robust strategies run through the same wrapper in process, in test_rounds.py;
    the binary task and the partitioners are unit-tested in test_data.py.)"""
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
    run = run_in_process(
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
            "strategy": "fedprox",
            "head": "mlp",
            "mlp-hidden": 16,
            "engine": "torch",
            # differential privacy: the boards clip, the server adds noise and accounts for it
            "dp-clipping-norm": DP_CLIP,
            "dp-noise-multiplier": 0.5,
            # (no class balance or label-skew correction: a DP run refuses their un-noised counts;
            # test_personal_ncm.py runs the counts-only query)
        },
    )
    summary, events = run["summary"], run["events"]
    assert [(r["clients_ok"], r["clients_failed"]) for r in summary["rounds"]] == [(2, 1), (2, 1)]
    assert not [e for e in events if e["event"] == "head-initialised"]  # no one-shot query in a DP run
    # client-2 has no folder: it fails both rounds, and says why once (a coded reason, not a traceback,
    # without the board's path)
    failures = [e for e in events if e["event"] == "client-failed"]
    assert len(failures) == 1 and failures[0]["setup_error"] is True, failures
    assert "does not exist" in failures[0]["reason"] and str(data) not in failures[0]["reason"]
    notes = [e.get("notes", "") for e in events if e["event"] == "client-reply"]
    assert any("ignored 1 class folder(s)" in note for note in notes)  # client-1's smudge/, not by name
    assert not any("smudge" in note for note in notes)
    assert summary["embedding"]["skipped"] == 4  # corrupt, empty, not an image, link out: counted once
    assert summary["classes"] == ["ok", "crack"]
    assert np.asarray(summary["final"]["confusion_matrix"]).sum() == 8
    assert {e["engine"] for e in events if e["event"] == "client-reply"} == {"torch"}
    head = np.load(run["run_dir"] / "head.npz")
    assert {k: list(head[k].shape) for k in head.files} == {
        "classifier.0.weight": [16, 1280],
        "classifier.0.bias": [16],
        "classifier.3.weight": [2, 16],
        "classifier.3.bias": [2],
    }
    # DP: every accepted update within the clipping norm; the noise once per round, over every node
    # the round was sent to (one that failed adds nothing); the budget from Flower's accountant
    norms = [e["update_norm"] for e in events if e["event"] == "client-reply" and e["phase"] == "train"]
    assert len(norms) == sum(r["clients_ok"] for r in summary["rounds"]) and max(norms) <= DP_CLIP * (1 + 1e-4)
    assert max(norms) == pytest.approx(DP_CLIP, rel=1e-3)  # the clipping did bind
    releases = [(e["round"], e["accepted"], e["sampled"]) for e in events if e["event"] == "dp-release"]
    sent = [r["clients_ok"] + r["clients_failed"] + r["clients_rejected"] for r in summary["rounds"]]
    assert releases == [(r["round"], r["clients_ok"], n) for r, n in zip(summary["rounds"], sent, strict=True)]
    epsilons = [r["dp_epsilon"] for r in summary["rounds"]]
    assert epsilons == pytest.approx([epsilon_spent([0.5] * n, 1e-5) for n in (1, 2)]) and epsilons[0] < epsilons[1]
    privacy = summary["privacy"]
    assert privacy["epsilon"] == epsilons[-1] and privacy["delta"] == 1e-5 and privacy["noised_rounds"] == 2
    assert f"epsilon {epsilons[-1]:.3f} at delta 1e-05" in run["output"]  # the round's log line
    # the aggregated head moved away from the seeded initial head the server started from
    initial = head_arrays(make_head("mlp", 1280, 2, 16, seed=42))
    assert any(not np.allclose(head[name], initial[name]) for name in initial)


def test_later_cut_fed3r_logit_adjusted_and_personal_heads(
    tmp_path: Path, server_engines: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cut=1: the backbone's last stage trains on the devices and travels with the head; Fed3R
    initialises the head from the clients' ridge sums (FedNCM shares that one-shot query's
    machinery; test_personal_ncm.py runs it), the class prior from their counts drives the
    logit-adjusted loss; clients score personal heads too; and the exported model (int8 backbone
    up to the cut, then the trained tail and head) reproduces the server's view-averaged accuracy
    on its held-out images."""
    from common.config import MIN_GRAM_ENV, RunConfig
    from common.exported_model import Classifier
    from server.server_run import server_test_files

    monkeypatch.setenv(MIN_GRAM_ENV, "2")  # each board's ~30 images are below the Gram floor: they opt in
    extra = {
        "cut": 1,
        "head-init": "fed3r",
        "class-balance": "logit-adjusted",
        "local-prior-correction": True,
        "ncm-min-examples": 2,
        "personal-epochs": 3,
        "views": "hflip",
    }
    run = run_in_process(tmp_path, "cut", tmp_path / "cache", server_engines, extra=extra)
    summary, events = run["summary"], run["events"]
    trainable = {
        "tail.0.0.weight": [1280, 320, 1, 1],  # conv_head
        "tail.0.1.scale": [1280],  # its batch norm, statistics folded in
        "tail.0.1.shift": [1280],
        **HEAD_SHAPES,
    }
    head = np.load(run["run_dir"] / "head.npz")
    assert {k: list(head[k].shape) for k in head.files} == trainable
    # every train reply carries exactly the trainable part; Fed3R's replies only ridge statistics
    for reply in run["audit"]:
        if reply["message_type"] == "train":
            assert {n: list(s) for n, (s, _) in reply["arrays"]["arrays"].items()} == trainable
    stats = [r["arrays"] for r in run["audit"] if r["message_type"] == "query" and r["arrays"]]
    assert len(stats) >= 3  # more where a slow machine made the server send the query again
    ridge = {"gram": [1280 * 1281 // 2], "sums": [4, 1280], "counts": [4]}  # the Gram's upper triangle
    assert all({n: list(s) for n, (s, _) in a["ridge-stats"].items()} == ridge for a in stats)
    init = [e for e in events if e["event"] == "head-initialised"]
    assert len(init) == 1 and init[0]["nodes"] >= 1 and init[0]["classes_set"]
    assert sum(init[0]["class_counts"]) > 0 and summary["head_init"]["method"] == "fed3r"
    assert init[0]["adjusted"] and init[0]["temperature"] > 1  # calibrated, bias adjusted by the prior
    assert init[0]["bytes_up"] > init[0]["nodes"] * 1280 * 1281 // 2 * 4  # each float32 triangle counted
    assert init[0]["backbones_sent"] == 3  # the backbone up to the cut went with Fed3R's query
    assert summary["class_balance"] == "logit-adjusted"
    initial = next(e for e in events if e["event"] == "initial-evaluation")
    assert 0 < initial["balanced_accuracy"] <= 1 and len(initial["per_class_recall"]) == 4
    for record in summary["rounds"]:
        assert record["clients_ok"] == 3 and record["backbones_sent"] == 0
        assert record["max_bytes_up_per_client"] > 1280 * 320 * 4  # the tail travels
        assert 0 <= record["client_personal_accuracy"] <= 1
    # the deployable model computes what the server evaluated
    info = json.loads((run["run_dir"] / "model" / "model.json").read_text())
    assert info["cut"] == 1 and info["feature_shape"] == [320, 7, 7] and len(info["views"]) == 2
    config = RunConfig.from_flower({**SMALL_RUN, **extra})
    test_files = server_test_files(config)
    classifier = Classifier(run["run_dir"] / "model")  # as `edgesplit predict` runs it by default
    assert classifier.form == "onnx-int8"  # the numerics the head was trained with (model.json)
    predictions = list(classifier.predict(list(zip(test_files.paths, test_files.labels, strict=True))))
    accuracy = np.mean([p.predicted == p.label for p in predictions])
    assert accuracy == pytest.approx(summary["final"]["accuracy"], abs=2 / len(predictions))
    # and the server checked the same at the end of the run
    check = summary["export_check"]
    assert check["ok"] and check["form"] == "onnx-int8" and check["accuracy"] == pytest.approx(accuracy)
