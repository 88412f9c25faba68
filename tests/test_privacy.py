"""The outgoing-reply guard: only the declared arrays (the trainable part, FedNCM's class
statistics or Fed3R's ridge statistics, each to its query), single numbers and short status
strings."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.privacy import (
    STATUS_KEYS,
    PrivacyViolation,
    example_floor,
    floor_violations,
    node_floor,
    privacy_guard,
    violations,
)
from common.flower_glue import to_array_record
from common.protocol import (
    ACTION,
    ARRAYS,
    CLASS_STATS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    RIDGE_STATS,
    STATUS,
    TRAIN_LOSS,
    BackboneStatus,
    ClassStats,
    QueryAction,
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


def test_a_head_update_passes() -> None:
    assert violations(_reply(), HEAD) == []


def test_every_status_the_protocol_defines_passes() -> None:
    assert set(ReplyStatus.keys()) | set(BackboneStatus.keys()) == STATUS_KEYS
    answer = BackboneStatus(engine="torch", held_fingerprint="").to_record()
    assert violations(_reply(arrays={}, configs={STATUS: answer}), {}) == []


def test_embeddings_cannot_ride_along_as_an_extra_array() -> None:
    arrays = {"arrays": {"weight": ((4, 1280), "float32"), "bias": ((4,), "float32"), "emb": ((200, 1280), "float32")}}
    problems = violations(_reply(arrays=arrays), HEAD)
    assert problems == ["arrays of 'arrays' are not the declared ones: unexpected ['emb'], missing []"]


def test_an_extra_array_record_is_refused() -> None:
    arrays = {"arrays": {"weight": ((4, 1280), "float32"), "bias": ((4,), "float32")}, "images": {"x": ((3,), "uint8")}}
    assert violations(_reply(arrays=arrays), HEAD) == ["array record 'images' is not allowed in this reply"]


def test_a_head_array_of_another_shape_is_refused() -> None:
    arrays = {"arrays": {"weight": ((200, 1280), "float32"), "bias": ((4,), "float32")}}
    assert violations(_reply(arrays=arrays), HEAD) == [
        "array 'weight' has shape (200, 1280), the declared one is (4, 1280)"
    ]


def test_replies_that_may_carry_no_arrays_refuse_any() -> None:
    assert violations(_reply(), {}) == ["array record 'arrays' is not allowed in this reply"]
    assert violations(_reply(arrays={}), {}) == []


def test_class_statistics_pass_only_where_declared() -> None:
    stats = {CLASS_STATS: {"sums": ((4, 1280), "float32"), "counts": ((4,), "float32")}}
    declared = {CLASS_STATS: ClassStats.shapes(4, 1280)}
    assert violations(_reply(arrays=stats), declared) == []
    assert violations(_reply(arrays=stats), HEAD) == ["array record 'class-stats' is not allowed in this reply"]
    per_image = {CLASS_STATS: {"sums": ((200, 1280), "float32"), "counts": ((4,), "float32")}}
    assert violations(_reply(arrays=per_image), declared) == [
        "array 'sums' has shape (200, 1280), the declared one is (4, 1280)"
    ]


def test_per_sample_metrics_are_refused() -> None:
    metrics = {METRICS: {NUM_EXAMPLES: 3, "per-sample-loss": [0.1, 0.2, 0.3]}}
    assert violations(_reply(metrics=metrics), HEAD) == ["metric 'per-sample-loss' is not a single number"]


def test_unknown_status_keys_and_long_strings_are_refused() -> None:
    configs = {STATUS: {"fingerprint": "ab", "file-names": "a.png,b.png"}, "extra": {}}
    assert violations(_reply(configs=configs), HEAD) == [
        "status key 'file-names' is not allowed",
        "config record 'extra' is not allowed",
    ]
    long_note = {STATUS: {"data-notes": "x" * 5000}}
    assert violations(_reply(configs=long_note), HEAD) == [
        "status 'data-notes' must be a string of at most 1000 characters"
    ]


# --- Fed3R's ridge statistics: only to their query, never below the board's floor -----------------


def _ridge_exchange(action: str, counts: list[float], node_config: dict) -> Message:
    """A query with ``action`` answered by a reply carrying ridge statistics of these counts,
    through the guard."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
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
    assert node_floor({"min-examples": 8}) == 8 and node_floor({}) is None


def test_ridge_statistics_leave_only_in_reply_to_their_query_and_from_enough_images() -> None:
    assert not _ridge_exchange(QueryAction.RIDGE_SUMS.value, [6, 0], {}).has_error()
    with pytest.raises(PrivacyViolation, match=r"class\(es\) \[1\] come from fewer than 5 images"):
        _ridge_exchange(QueryAction.RIDGE_SUMS.value, [6, 3], {})  # the server asked for 2; the board keeps 5
    with pytest.raises(PrivacyViolation, match="fewer than 10 images"):
        _ridge_exchange(QueryAction.RIDGE_SUMS.value, [6, 0], {"min-examples": 10})
    with pytest.raises(PrivacyViolation, match="'ridge-stats' is not allowed"):
        _ridge_exchange(QueryAction.CLASS_SUMS.value, [6, 6], {})  # FedNCM's query
    expected = ["statistics of class(es) [2] come from fewer than 5 images"]
    assert floor_violations(np.array([0.0, 5.0, 4.0]), 5) == expected
