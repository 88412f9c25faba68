"""No reply can end a run. The ServerApp's reply path (screening, then the Flower strategy's average,
and the one-shot statistics' screening) is fed replies whose records, array bytes, dtypes, shapes,
numbers and strings are arbitrary: the round goes on with the honest node's reply, and the event
log either takes the fuzzed reply in or names its rejection."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common import protocol
from common.flower_glue import act_as, mark_pushed, to_array_record
from common.protocol import Phase, ReplyStatus
from server.run_folder import RunLog
from tests.test_strategy import FP, StubGrid, StubRun, _config, _edge_strategy, _head, _reply

DTYPES = ["float32", "float64", "float16", "int64", "uint8", "bool", "complex64", "<U3", "S2"]
RECORD_NAMES = [protocol.ARRAYS, protocol.METRICS, protocol.STATUS, protocol.RIDGE_STATS, protocol.CLASS_STATS, "x"]
METRIC_KEYS = [*protocol.METRIC_RANGES, protocol.TRAIN_LOSS, "made-up"]
numbers = st.one_of(st.integers(-(2**62), 2**62), st.floats(allow_nan=True, allow_infinity=True))


@st.composite
def arbitrary_array(draw: st.DrawFn) -> Array:
    """A real array of any dtype and small shape, or bytes that claim to be one."""
    if draw(st.booleans()):
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
        return Array(draw(hnp.arrays(draw(st.sampled_from(DTYPES)), shape)))
    dims = draw(st.lists(st.integers(0, 5), max_size=3))
    return Array(
        dtype=draw(st.sampled_from([*DTYPES, "junk"])),
        shape=tuple(dims),
        stype="numpy.ndarray",
        data=draw(st.binary(max_size=64)),
    )


def arbitrary_record(draw: st.DrawFn) -> ArrayRecord | MetricRecord | ConfigRecord:
    kind = draw(st.sampled_from(["arrays", "metrics", "config"]))
    if kind == "arrays":
        names = st.sampled_from(["weight", "bias", "gram", "sums", "counts", "z"])
        return ArrayRecord(draw(st.dictionaries(names, arbitrary_array(), max_size=4)))
    if kind == "metrics":
        values = st.one_of(numbers, st.lists(st.floats(allow_nan=True), max_size=3))
        return MetricRecord(draw(st.dictionaries(st.sampled_from(METRIC_KEYS), values, max_size=6)))
    keys = st.sampled_from([*ReplyStatus.keys(), "other"])
    values = st.one_of(
        st.text(max_size=80), numbers, st.booleans(), st.binary(max_size=8), st.lists(st.text(max_size=4), max_size=3)
    )
    return ConfigRecord(draw(st.dictionaries(keys, values, max_size=6)))


@st.composite
def fuzzed_content(draw: st.DrawFn, honest: RecordDict) -> RecordDict | Error:
    """An honest reply's content with one to three of its records replaced, dropped or added; or
    an error reply with an arbitrary code and reason."""
    if draw(st.integers(0, 9)) == 0:
        return Error(code=draw(st.integers(0, 10**6)), reason=draw(st.text(max_size=200)))
    content = RecordDict({name: record for name, record in honest.items()})
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(RECORD_NAMES))
        if name in content and draw(st.booleans()):
            del content[name]
        else:
            content[name] = arbitrary_record(draw)
    return content


def _verdicts(run_log: RunLog, phase: str) -> dict[int, dict[str, Any]]:
    run_log.close()
    lines = (run_log.run_dir / "events.jsonl").read_text().splitlines()
    kinds = ("client-reply", "client-rejected", "client-failed")
    return {e["node"]: e for e in map(json.loads, lines) if e["event"] in kinds and e.get("phase") == phase}


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.data())
def test_no_train_or_evaluate_reply_ends_the_round(tmp_path_factory: Any, data: st.DataObject) -> None:
    act_as(0)  # the ServerApp
    run_dir = tmp_path_factory.mktemp("fuzz") / "run"
    strategy = _edge_strategy(StubRun(RunLog(run_dir)))
    grid = StubGrid([1, 2], holders={1, 2})
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_array_record(_head(0)), _config(), grid)}  # type: ignore[arg-type]
    for message in sent.values():
        mark_pushed(message)
    honest = _reply(sent[1], _head(0.5))
    fuzz = data.draw(fuzzed_content(_reply(sent[2], _head(0.25)).content))
    act_as(2)
    fuzzed = Message(fuzz, reply_to=sent[2])
    arrays, _ = strategy.aggregate_train(1, [honest, fuzzed])
    assert arrays is not None  # the round went on
    verdicts = _verdicts(strategy.run_log, "train")
    assert set(verdicts) == {1, 2} and verdicts[1]["event"] == "client-reply"
    assert verdicts[2]["event"] == "client-reply" or verdicts[2]["reason"]
    if verdicts[2]["event"] == "client-reply":  # a fuzzed reply that was taken in is a valid update
        weights = arrays["weight"].numpy()
        assert np.all(np.isfinite(weights)) and weights.dtype == np.float32


@SETTINGS
@given(data=st.data())
def test_no_statistics_reply_ends_the_query(tmp_path_factory: Any, data: st.DataObject) -> None:
    act_as(0)
    run_dir = tmp_path_factory.mktemp("fuzz-stats") / "run"
    strategy = _edge_strategy(StubRun(RunLog(run_dir)))
    grid = StubGrid([1, 2], holders={1, 2})
    sent = strategy.prepare(
        Phase.RIDGE_SUMS, [Message(RecordDict({protocol.CONFIG: _config()}), n, "query") for n in (1, 2)], grid
    )  # type: ignore[arg-type]
    for message in sent:
        mark_pushed(message)
    gram = np.eye(3, dtype=np.float32) * 4
    stats = {
        "gram": gram[np.triu_indices(3)],
        "sums": np.ones((2, 3), np.float32),
        "counts": np.array([3, 3], np.float32),
    }
    status = ReplyStatus(fingerprint=FP, engine="torch", engine_fingerprint=FP).to_record()
    honest_content = RecordDict(
        {
            protocol.RIDGE_STATS: to_array_record(stats),
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 6, protocol.EMBEDDINGS_CACHED: 6}),
            protocol.STATUS: ConfigRecord(status),
        }
    )
    act_as(1)
    honest = Message(honest_content, reply_to=sent[0])
    act_as(2)
    fuzzed = Message(data.draw(fuzzed_content(honest_content)), reply_to=sent[1])
    accepted = strategy.screened(Phase.RIDGE_SUMS, [honest, fuzzed]).accepted
    assert honest in accepted
    verdicts = _verdicts(strategy.run_log, "ridge-sums")
    assert set(verdicts) == {1, 2}
    assert verdicts[2]["event"] == "client-reply" or verdicts[2]["reason"]
