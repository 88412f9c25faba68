"""Server-side reply screening, the run folder writer, and the client's backbone cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from client.core import BackboneCache, FingerprintMismatch
from common import protocol
from common.backbones import fingerprint
from common.preprocess import PreprocessSpec
from common.protocol import ClassStats
from server.runlog import RunLog, new_run_id, write_json_atomic
from server.validation import class_stats_reject_reason, reject_reason

# --- reject_reason --------------------------------------------------------------------------------

FP = "ab" * 32
SHAPES = {"weight": (3, 4), "bias": (3,)}


def _arrays() -> dict[str, np.ndarray]:
    return {"weight": np.full((3, 4), 0.1, dtype=np.float32), "bias": np.zeros(3, dtype=np.float32)}


def _reason(arrays=None, num_examples=10, fp=FP, shapes=SHAPES):
    metrics = {} if num_examples is ... else {protocol.NUM_EXAMPLES: num_examples}
    return reject_reason(_arrays() if arrays is None else arrays, metrics, fp, shapes, FP)


def test_good_train_reply_is_accepted():
    assert _reason() is None


def test_integral_float_num_examples_is_accepted():
    assert _reason(num_examples=12.0) is None


def test_wrong_fingerprint_is_rejected():
    reason = _reason(fp="cd" * 32)

    assert reason is not None
    assert "fingerprint" in reason
    assert "'cdcdcdcdcdcd'" in reason


def test_missing_fingerprint_is_rejected():
    reason = _reason(fp=None)

    assert reason is not None and "fingerprint" in reason


def test_missing_array_name_is_rejected():
    arrays = _arrays()
    del arrays["bias"]

    reason = _reason(arrays=arrays)

    assert reason is not None
    assert "array names" in reason and "'bias'" in reason


def test_wrong_shape_is_rejected():
    arrays = _arrays()
    arrays["weight"] = np.zeros((4, 3), dtype=np.float32)

    reason = _reason(arrays=arrays)

    assert reason is not None
    assert "shape" in reason and "(4, 3)" in reason and "(3, 4)" in reason


def test_float64_is_rejected():
    arrays = _arrays()
    arrays["bias"] = arrays["bias"].astype(np.float64)

    reason = _reason(arrays=arrays)

    assert reason is not None
    assert "dtype" in reason and "float64" in reason


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad):
    arrays = _arrays()
    arrays["weight"][1, 2] = bad

    reason = _reason(arrays=arrays)

    assert reason is not None
    assert "NaN or Inf" in reason and "'weight'" in reason


def test_huge_norm_is_rejected():
    arrays = _arrays()
    arrays["bias"][0] = 2e4  # bound is 1e4

    reason = _reason(arrays=arrays)

    assert reason is not None
    assert "norm" in reason and "'bias'" in reason


def test_norm_just_below_the_bound_is_accepted():
    arrays = _arrays()
    arrays["bias"][0] = 9e3  # weight norm is 0.1 * sqrt(12), bias norm 9e3

    assert _reason(arrays=arrays) is None


def test_no_arrays_in_a_train_reply_is_rejected():
    reason = reject_reason(None, {protocol.NUM_EXAMPLES: 5}, FP, SHAPES, FP)

    assert reason is not None and "no head arrays" in reason


@pytest.mark.parametrize(
    ("num_examples", "expected"),
    [
        (0, "positive"),
        (-3, "positive"),
        (2.5, "integer"),
        (True, "integer"),
        ("10", "integer"),
        (None, "integer"),
        (..., "integer"),  # the key is missing
    ],
)
def test_bad_num_examples_is_rejected(num_examples, expected):
    reason = _reason(num_examples=num_examples)

    assert reason is not None
    assert "num-examples" in reason and expected in reason


@pytest.mark.parametrize("num_examples", [math.nan, math.inf])
def test_non_finite_num_examples_is_rejected_not_raised(num_examples):
    """A client must not crash the server's screening with a NaN or Inf count."""
    reason = _reason(num_examples=num_examples)

    assert reason is not None
    assert "num-examples" in reason


def test_evaluation_reply_accepts_zero_examples():
    assert reject_reason(None, {protocol.NUM_EXAMPLES: 0}, FP, None, FP) is None


def test_evaluation_reply_still_checks_fingerprint_and_count():
    assert "fingerprint" in (reject_reason(None, {protocol.NUM_EXAMPLES: 3}, "x", None, FP) or "")
    assert "integer" in (reject_reason(None, {protocol.NUM_EXAMPLES: 2.5}, FP, None, FP) or "")


# --- run log --------------------------------------------------------------------------------------


def test_write_json_atomic_turns_non_finite_numbers_into_null(tmp_path):
    # Prepare
    path = tmp_path / "summary.json"
    document = {
        "loss": float("nan"),
        "nested": {"values": [1.5, float("inf"), np.float32("nan"), np.int64(3)]},
        "tuple": (float("-inf"), 2),
        4: "int key",
    }

    # Execute
    write_json_atomic(path, document)

    # Assert
    parsed = json.loads(path.read_text())  # strict: would fail on NaN tokens only with a custom parser
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert parsed == {"loss": None, "nested": {"values": [1.5, None, None, 3]}, "tuple": [None, 2], "4": "int key"}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_write_json_atomic_replaces_an_existing_file(tmp_path):
    path = tmp_path / "config.json"
    write_json_atomic(path, {"a": 1})

    write_json_atomic(path, {"a": 2})

    assert json.loads(path.read_text()) == {"a": 2}


def test_run_log_writes_parseable_event_lines(tmp_path):
    # Prepare
    run_dir = tmp_path / "runs" / "r1"
    log = RunLog(run_dir)

    # Execute
    log.event("round-start", round=1)
    log.event("client-reply", round=1, metrics={"loss": float("nan"), "acc": np.float64(0.5)}, text="a\nb")
    log.write_config({"seed": 42})
    log.write_summary({"best": float("inf")})
    log.close()

    # Assert
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    assert len(lines) == 2
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["round-start", "client-reply"]
    assert events[1]["metrics"] == {"loss": None, "acc": 0.5}
    assert events[1]["text"] == "a\nb"
    assert all(isinstance(e["time"], float) for e in events)
    assert json.loads((run_dir / "config.json").read_text()) == {"seed": 42}
    assert json.loads((run_dir / "summary.json").read_text()) == {"best": None}


def test_run_log_refuses_an_existing_folder(tmp_path):
    run_dir = tmp_path / "r1"
    run_dir.mkdir()

    with pytest.raises(FileExistsError):
        RunLog(run_dir)


def test_run_log_saves_the_head(tmp_path):
    log = RunLog(tmp_path / "r")
    arrays = {"weight": np.ones((2, 3), dtype=np.float32), "bias": np.zeros(2, dtype=np.float32)}

    path = log.save_head(arrays, {"classes": ["a", "b"]})
    log.close()

    with np.load(path) as loaded:
        assert sorted(loaded.files) == ["bias", "weight"]
        np.testing.assert_array_equal(loaded["weight"], arrays["weight"])
    assert json.loads((tmp_path / "r" / "head.json").read_text()) == {"classes": ["a", "b"]}


def test_new_run_id():
    assert new_run_id(7, "mine") == "mine"
    assert new_run_id(7).endswith("-7")
    assert len(new_run_id(None)) == len("20250101-120000")


# --- client backbone cache ------------------------------------------------------------------------


@pytest.fixture
def fresh_process_state():
    """BackboneCache keeps per-process class-level dicts; isolate each test from the others."""
    BackboneCache._verified.clear()
    BackboneCache._engines.clear()
    yield
    BackboneCache._verified.clear()
    BackboneCache._engines.clear()


def _tiny_state() -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "layer.bias": torch.zeros(3)}


PRE = PreprocessSpec(image_size=32)


def test_store_then_holds(tmp_path, fresh_process_state):
    # Prepare
    cache = BackboneCache(tmp_path)
    fp = fingerprint("tiny", _tiny_state(), PRE)

    # Execute
    held_before = cache.holds(fp)
    cache.store("tiny", _tiny_state(), PRE, fp)

    # Assert
    assert held_before is False
    assert cache.holds(fp) is True
    assert (tmp_path / "backbones" / f"{fp}.pt").is_file()
    assert [p.name for p in (tmp_path / "backbones").iterdir()] == [f"{fp}.pt"]  # no temporary left


def test_a_new_process_verifies_the_stored_file(tmp_path, fresh_process_state):
    fp = fingerprint("tiny", _tiny_state(), PRE)
    BackboneCache(tmp_path).store("tiny", _tiny_state(), PRE, fp)
    BackboneCache._verified.clear()

    assert BackboneCache(tmp_path).holds(fp) is True
    assert BackboneCache._verified[tmp_path / "backbones" / f"{fp}.pt"] == fp


def test_store_refuses_weights_that_do_not_match_the_announced_fingerprint(tmp_path, fresh_process_state):
    # Prepare
    cache = BackboneCache(tmp_path)
    announced = fingerprint("tiny", _tiny_state(), PRE)
    received = _tiny_state()
    received["layer.bias"][0] = 1e-6  # one element changed in transit

    # Execute
    with pytest.raises(FingerprintMismatch) as caught:
        cache.store("tiny", received, PRE, announced)

    # Assert
    assert announced[:12] in str(caught.value)
    assert not cache.holds(announced)
    assert not (tmp_path / "backbones" / f"{announced}.pt").exists()


def test_corrupted_file_is_not_held_and_is_deleted(tmp_path, fresh_process_state):
    # Prepare
    fp = fingerprint("tiny", _tiny_state(), PRE)
    BackboneCache(tmp_path).store("tiny", _tiny_state(), PRE, fp)
    path = tmp_path / "backbones" / f"{fp}.pt"
    stored = torch.load(path, weights_only=True)
    stored["state"]["layer.weight"][2, 3] = -1.0
    torch.save(stored, path)
    BackboneCache._verified.clear()  # a new process: nothing verified, nothing built
    BackboneCache._engines.clear()

    # Execute
    held = BackboneCache(tmp_path).holds(fp)

    # Assert
    assert held is False
    assert not path.exists()
    assert BackboneCache(tmp_path).holds(fp) is False


def test_unreadable_file_is_not_held_and_is_deleted(tmp_path, fresh_process_state):
    """A cached file that torch cannot read (bit rot, a partial manual copy) is corrupt too:
    holds() should say False and remove it so that the server sends the backbone again."""
    # Prepare
    fp = fingerprint("tiny", _tiny_state(), PRE)
    BackboneCache(tmp_path).store("tiny", _tiny_state(), PRE, fp)
    path = tmp_path / "backbones" / f"{fp}.pt"
    path.write_bytes(path.read_bytes()[:100])
    BackboneCache._verified.clear()

    # Execute
    held = BackboneCache(tmp_path).holds(fp)

    # Assert
    assert held is False
    assert not path.exists()


def test_class_statistics_screening() -> None:
    dim = 16
    sums = np.full((3, dim), 0.5, np.float32)  # mean length 2, below sqrt(16) = 4
    sums[2] = 0.0  # a class the client does not share
    honest = {"sums": sums, "counts": np.array([4, 1, 0], np.float32)}
    assert class_stats_reject_reason(honest, ClassStats.shapes(3, dim)) is None
    forged = {**honest, "sums": honest["sums"] * 100}  # a class mean longer than any normalised feature
    assert (
        class_stats_reject_reason(forged, ClassStats.shapes(3, dim))
        == "a class mean is longer than any normalised feature can be"
    )
    negative = {**honest, "counts": np.array([4, -1, 0], np.float32)}
    assert (
        class_stats_reject_reason(negative, ClassStats.shapes(3, dim)) == "class counts must be non-negative integers"
    )
    per_image = {**honest, "sums": np.zeros((40, dim), np.float32)}
    assert (
        class_stats_reject_reason(per_image, ClassStats.shapes(3, dim))
        == "array 'sums' has shape (40, 16), expected (3, 16)"
    )
