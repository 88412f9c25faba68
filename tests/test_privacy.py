"""The outgoing-reply guard: only the declared arrays (the trainable part, FedNCM's class
statistics or Fed3R's ridge statistics, each to its query) in float, the metrics the protocol lists
for the reply's kind as single numbers, and short status strings; and the board's own privacy floor."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.edge_client import EdgeClient, EmbeddedData
from client.privacy import STATUS_KEYS, PrivacyViolation, privacy_guard, violations
from client.privacy_floor import example_floor, floor_violations
from common.config import NodeConfig, RunConfig
from common.embedding import EmbedStats
from common.flower_glue import act_as, to_array_record
from common.numpy_head import initial_arrays
from common.protocol import (
    ACCURACY,
    ACTION,
    ARRAYS,
    CLASS_STATS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    PERSONAL_ACCURACY,
    REPLY_METRICS,
    RIDGE_STATS,
    STATUS,
    TRAIN_LOSS,
    TRAIN_METRICS,
    BackboneStatus,
    ClassStats,
    Phase,
    ReplyStatus,
    RidgeStats,
)
from tests.protocol_samples import instructions

HEAD = {ARRAYS: {"weight": (4, 1280), "bias": (4,)}}
STATUS_RECORD = ReplyStatus(fingerprint="ab" * 32, engine="onnx-int8", engine_fingerprint="cd" * 32).to_record()


def _reply(**parts: object) -> dict[str, object]:
    reply: dict[str, object] = {
        "arrays": {ARRAYS: {"weight": ((4, 1280), "float32"), "bias": ((4,), "float32")}},
        "metrics": {METRICS: {NUM_EXAMPLES: 100, TRAIN_LOSS: 0.5}},
        "configs": {STATUS: STATUS_RECORD},
    }
    reply.update(parts)
    return reply


def _violations(reply: dict[str, object], allowed: object) -> list[str]:
    return violations(reply, allowed, TRAIN_METRICS)  # type: ignore[arg-type]


def test_a_head_update_passes() -> None:
    assert _violations(_reply(), HEAD) == []


def test_every_status_the_protocol_defines_passes() -> None:
    assert set(ReplyStatus.keys()) | set(BackboneStatus.keys()) == STATUS_KEYS
    answer = BackboneStatus(engine="torch", held_fingerprint="").to_record()
    assert _violations(_reply(arrays={}, configs={STATUS: answer}), {}) == []


def test_embeddings_cannot_ride_along_as_an_extra_array() -> None:
    arrays = {"arrays": {"weight": ((4, 1280), "float32"), "bias": ((4,), "float32"), "emb": ((200, 1280), "float32")}}
    problems = _violations(_reply(arrays=arrays), HEAD)
    assert problems == ["arrays of 'arrays' are not the declared ones: unexpected ['emb'], missing []"]


def test_an_extra_array_record_is_refused() -> None:
    arrays = {"arrays": {"weight": ((4, 1280), "float32"), "bias": ((4,), "float32")}, "images": {"x": ((3,), "uint8")}}
    assert _violations(_reply(arrays=arrays), HEAD) == ["array record 'images' is not allowed in this reply"]


def test_a_head_array_of_another_shape_is_refused() -> None:
    arrays = {"arrays": {"weight": ((200, 1280), "float32"), "bias": ((4,), "float32")}}
    assert _violations(_reply(arrays=arrays), HEAD) == [
        "array 'weight' has shape (200, 1280), the declared one is (4, 1280)"
    ]


def test_replies_that_may_carry_no_arrays_refuse_any() -> None:
    assert _violations(_reply(), {}) == ["array record 'arrays' is not allowed in this reply"]
    assert _violations(_reply(arrays={}), {}) == []


def test_class_statistics_pass_only_where_declared() -> None:
    stats = {CLASS_STATS: {"sums": ((4, 1280), "float32"), "counts": ((4,), "float32")}}
    declared = {CLASS_STATS: ClassStats.shapes(4, 1280)}
    assert _violations(_reply(arrays=stats), declared) == []
    assert _violations(_reply(arrays=stats), HEAD) == ["array record 'class-stats' is not allowed in this reply"]
    per_image = {CLASS_STATS: {"sums": ((200, 1280), "float32"), "counts": ((4,), "float32")}}
    assert _violations(_reply(arrays=per_image), declared) == [
        "array 'sums' has shape (200, 1280), the declared one is (4, 1280)"
    ]


def test_per_sample_metrics_are_refused() -> None:
    metrics = {METRICS: {NUM_EXAMPLES: 3, "per-sample-loss": [0.1, 0.2, 0.3]}}
    assert _violations(_reply(metrics=metrics), HEAD) == ["metric 'per-sample-loss' is not a single number"]


def test_unknown_status_keys_and_long_strings_are_refused() -> None:
    configs = {STATUS: {"fingerprint": "ab", "file-names": "a.png,b.png"}, "extra": {}}
    assert _violations(_reply(configs=configs), HEAD) == [
        "status key 'file-names' is not allowed",
        "config record 'extra' is not allowed",
    ]
    long_note = {STATUS: {"data-notes": "x" * 5000}}
    assert _violations(_reply(configs=long_note), HEAD) == [
        "status 'data-notes' must be a string of at most 1000 characters"
    ]


# --- dtypes and metric names (issue 19) ------------------------------------------------------------


def test_only_float_arrays_leave_and_a_declared_dtype_is_kept() -> None:
    as_bytes = {ARRAYS: {"weight": ((4, 1280), "uint8"), "bias": ((4,), "float32")}}
    assert _violations(_reply(arrays=as_bytes), HEAD) == [
        "array 'weight' has dtype uint8, the declared one is float32 or float64"
    ]
    declared = {ARRAYS: {"weight": ((4, 1280), "float32"), "bias": ((4,), "float32")}}
    wider = {ARRAYS: {"weight": ((4, 1280), "float64"), "bias": ((4,), "float32")}}
    assert _violations(_reply(arrays=wider), declared) == [
        "array 'weight' has dtype float64, the declared one is float32"
    ]
    assert _violations(_reply(), declared) == []


def test_metrics_are_a_closed_list_per_message_kind() -> None:
    extra = {METRICS: {NUM_EXAMPLES: 3, "debug-file-count": 12.0}}
    assert _violations(_reply(metrics=extra), HEAD) == ["metric 'debug-file-count' is not one this reply may carry"]
    scores = {METRICS: {NUM_EXAMPLES: 3, ACCURACY: 0.5, PERSONAL_ACCURACY: 0.6}}
    assert violations(_reply(arrays={}, metrics=scores), {}, REPLY_METRICS["evaluate"]) == []
    assert violations(_reply(arrays={}, metrics=scores), {}, REPLY_METRICS["query"]) == [
        f"metric {ACCURACY!r} is not one this reply may carry",
        f"metric {PERSONAL_ACCURACY!r} is not one this reply may carry",
    ]
    assert violations(_reply(arrays={}), {}, None) == [  # a backbone-status answer carries no metrics
        f"metric {NUM_EXAMPLES!r} is not one this reply may carry",
        f"metric {TRAIN_LOSS!r} is not one this reply may carry",
    ]


# --- the privacy floor: the board's, not the server's ----------------------------------------------


@pytest.mark.parametrize(
    ("requested", "node_floor", "floor"), [(1, None, 5), (1, 3, 3), (8, 3, 8), (1, 2, 2), (0, None, 5), (7, None, 7)]
)
def test_the_server_can_raise_the_floor_never_lower_it(requested: int, node_floor: int | None, floor: int) -> None:
    assert example_floor(requested, node_floor) == floor
    assert example_floor(requested, node_floor) >= 2


def test_a_server_asking_for_a_floor_of_one_gets_no_single_image_class() -> None:
    """A server that sends ncm-min-examples=1 (the schema refuses it; a crafted message need not)
    must not get one image's features back: the board applies its own floor (5 by default)."""
    features = np.random.default_rng(0).normal(size=(9, 1, 1280)).astype(np.float32)
    labels = np.array([0] * 8 + [1])  # class 1 holds one image
    embedded = EmbeddedData(features, labels, features[:0], labels[:0], EmbedStats())
    head = initial_arrays("linear", 1280, 2, seed=0)
    sent = instructions(ncm_min_examples=1)
    for node, kept in ((NodeConfig(), [8, 0]), (NodeConfig(min_examples=9), [0, 0])):
        client = EdgeClient(RunConfig(), node)
        client.embedded = lambda _: embedded  # type: ignore[method-assign]  # no backbone needed for the sums
        stats, _ = client.class_sums(head, sent)
        assert stats.counts.tolist() == kept
        assert not stats.sums[1].any()  # the lone image's features stay on the board


# --- Fed3R's ridge statistics: only to their query, never below the board's floor -----------------


def _ridge_exchange(action: str, counts: list[float], node_config: dict) -> Message:
    """A query with ``action`` answered by a reply carrying ridge statistics of these counts,
    through the guard."""
    act_as(1)
    config = {**instructions(ncm_min_examples=2, num_classes=2).to_record(), ACTION: action}
    msg = Message(content=RecordDict({CONFIG: ConfigRecord(config)}), dst_node_id=1, message_type=MessageType.QUERY)
    shapes = RidgeStats.shapes(2, 1280)
    stats = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    stats["counts"] = np.asarray(counts, np.float32)
    content = RecordDict({RIDGE_STATS: to_array_record(stats)})
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    return privacy_guard(msg, context, lambda m, c: Message(content=content, reply_to=m))


def test_example_floor_is_the_boards_unless_the_server_asks_for_more() -> None:
    assert example_floor(2, None) == 5  # a board that sets nothing keeps 5
    assert example_floor(20, None) == 20
    assert example_floor(2, 12) == 12  # the server cannot lower a board's floor
    assert example_floor(1, 1) == 2
    assert NodeConfig.from_flower({"min-examples": 8}).min_examples == 8 and NodeConfig().min_examples is None


def test_ridge_statistics_leave_only_in_reply_to_their_query_and_from_enough_images() -> None:
    small = {"min-gram-examples": 6}  # a board that knowingly shares the Gram of as few as 6 images
    assert not _ridge_exchange(Phase.RIDGE_SUMS.value, [6, 0], small).has_error()
    with pytest.raises(PrivacyViolation, match=r"class\(es\) \[1\] come from fewer than 5 images"):
        _ridge_exchange(Phase.RIDGE_SUMS.value, [6, 3], small)  # the server asked for 2; the board keeps 5
    with pytest.raises(PrivacyViolation, match="fewer than 10 images"):
        _ridge_exchange(Phase.RIDGE_SUMS.value, [6, 0], {**small, "min-examples": 10})
    with pytest.raises(PrivacyViolation, match="'ridge-stats' is not allowed"):
        _ridge_exchange(Phase.CLASS_SUMS.value, [6, 6], small)  # FedNCM's query
    # the Gram floor: by default the feature dimension (1280), below which the Gram is a membership test
    with pytest.raises(PrivacyViolation, match="a Gram matrix of 6 images is below this board's floor of 1280"):
        _ridge_exchange(Phase.RIDGE_SUMS.value, [6, 0], {})
    expected = ["statistics of class(es) [2] come from fewer than 5 images"]
    assert floor_violations(np.array([0.0, 5.0, 4.0]), 5) == expected
