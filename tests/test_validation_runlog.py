"""Server-side reply screening, the run folder writer, and the client's backbone cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common import protocol
from common.kinds import EventKind
from server.run_folder import RunLog, new_run_id, write_json_atomic
from server.validation import examples_bounds, metrics_reject_reason, reject_reason

# --- reject_reason --------------------------------------------------------------------------------

FP = "ab" * 32
SHAPES = {"weight": (3, 4), "bias": (3,)}


def _arrays() -> dict[str, np.ndarray]:
    return {"weight": np.full((3, 4), 0.1, dtype=np.float32), "bias": np.zeros(3, dtype=np.float32)}


HELD = {protocol.EMBEDDINGS_COMPUTED: 40, protocol.EMBEDDINGS_CACHED: 10}  # the node's own images


def _reason(arrays=None, num_examples=10, fp=FP, shapes=SHAPES):
    metrics = dict(HELD) if num_examples is ... else {protocol.NUM_EXAMPLES: num_examples, **HELD}
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
    reason = reject_reason(None, {protocol.NUM_EXAMPLES: 5, **HELD}, FP, SHAPES, FP)

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


# --- a node's numbers are bounded before they are used or shown (issue 19) -----------------------


@pytest.mark.parametrize("shapes", [SHAPES, None], ids=["train", "evaluate"])
def test_a_claim_of_ten_to_the_fifteen_examples_is_refused(shapes):
    arrays = _arrays() if shapes else None
    huge = {protocol.NUM_EXAMPLES: 10**15, protocol.EMBEDDINGS_CACHED: 10**15}
    assert "num-examples" in (metrics_reject_reason(huge, (protocol.NUM_EXAMPLES,)) or "")
    # below the count limit, the run's cap and the node's own image count still bound it
    claim = {protocol.NUM_EXAMPLES: 5_000_000, protocol.EMBEDDINGS_CACHED: 5_000_000}
    assert "max-num-examples=1000000" in (reject_reason(arrays, claim, FP, shapes, FP) or "")
    beyond = {protocol.NUM_EXAMPLES: 900, **HELD}
    assert "more than the 50 images the node says it embedded" in (reject_reason(arrays, beyond, FP, shapes, FP) or "")
    assert "first reported" in (
        reject_reason(arrays, {protocol.NUM_EXAMPLES: 30, **HELD}, FP, shapes, FP, examples_before=20) or ""
    )
    assert reject_reason(arrays, {protocol.NUM_EXAMPLES: 50, **HELD}, FP, shapes, FP) is None
    # a counts-only reply embeds nothing: its count is bounded by the cap and its first claim only
    assert reject_reason(None, {protocol.NUM_EXAMPLES: 900}, FP, None, FP, embedded=False) is None
    assert "max-num-examples" in (reject_reason(None, claim, FP, None, FP, embedded=False) or "")


def test_a_first_claim_far_above_the_rounds_median_is_refused():
    claims = {1: 40, 2: 60, 3: 50, 4: 4_000_000, 5: 0}
    assert set(examples_bounds(claims, unseen={1, 2, 3, 4, 5})) == {4}
    assert "median 55" in examples_bounds(claims, unseen={4})[4]
    assert examples_bounds(claims, unseen={1, 2, 3}) == {}  # a node seen before is held to its first claim
    assert examples_bounds({1: 40, 4: 4_000_000}, unseen={4}) == {}  # two claims make no median to trust


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (protocol.TRAIN_SECONDS, 1e308),
        (protocol.EMBED_SECONDS, -1.0),
        (protocol.ACCURACY, 1.5),
        (protocol.MACRO_F1, -0.1),
        (protocol.TRAIN_ACCURACY, math.nan),
        (protocol.CPU_TEMP_C, 1e6),
        (protocol.PEAK_RSS_MB, math.inf),
    ],
)
def test_a_metric_outside_its_range_rejects_the_reply(key, value):
    reason = metrics_reject_reason({protocol.NUM_EXAMPLES: 5, key: value}, (protocol.NUM_EXAMPLES,))
    assert reason is not None and repr(key) in reason
    assert metrics_reject_reason({protocol.NUM_EXAMPLES: 5, key: 0.5}, (protocol.NUM_EXAMPLES,)) is None


# --- the board's backbone cache keeps to its folder (issue 19) -------------------------------------


def test_a_crafted_fingerprint_cannot_delete_or_write_outside_the_cache(tmp_path):
    from client.backbone_cache import BackboneCache
    from client.lru import LruCache
    from common.engines import ENGINE_KINDS
    from common.protocol import ProtocolError
    from tests.protocol_samples import instructions

    victim = tmp_path / "victim.pt"
    victim.write_bytes(b"not a backbone: today's cache would delete it as a failed copy")
    cache = BackboneCache(tmp_path / "cache", LruCache(4), LruCache(1))
    cache.directory.mkdir(parents=True)  # a board that has held a backbone before
    escape = "../../victim"  # <cache>/backbones/../../victim.pt is the victim
    with pytest.raises(ProtocolError, match="64 lowercase hex"):
        cache.held(ENGINE_KINDS["torch"], escape)
    sent = instructions(fingerprint="../../planted", engine="onnx")
    with pytest.raises(ProtocolError, match="64 lowercase hex"):
        cache.keep(ENGINE_KINDS["onnx"], {protocol.ONNX_MODEL: np.zeros(4, np.uint8)}, sent)
    with pytest.raises(ProtocolError):
        cache.golden(escape)
    assert victim.read_bytes().startswith(b"not a backbone")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["victim.pt"]  # nothing planted


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
    log.event(EventKind.ROUND_RETRY, round=1, attempt=2)
    log.event(EventKind.CLIENT_REPLY, round=1, metrics={"loss": float("nan"), "acc": np.float64(0.5)}, text="a\nb")
    log.write_config({"seed": 42})
    log.write_summary({"best": float("inf")})
    log.close()

    # Assert
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    assert len(lines) == 2
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["round-retry", "client-reply"]  # the plain values
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
