"""The outgoing-reply guard: only the declared arrays (the trainable part, or FedNCM's class
statistics), single numbers and short status strings."""

from __future__ import annotations

from client.privacy import STATUS_KEYS, violations
from common.protocol import (
    ARRAYS,
    CLASS_STATS,
    METRICS,
    NUM_EXAMPLES,
    STATUS,
    TRAIN_LOSS,
    BackboneStatus,
    ClassStats,
    ReplyStatus,
)

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
