"""Every string a board sends reaches the server's log, events, summary and dashboard capped and
without control characters: status fields, error reasons, metric names, a SuperNode's name, and a
malformed status quoted back in a rejection."""

from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from common import protocol
from common.board_text import MAX_BOARD_TEXT, board_text
from common.flower_glue import act_as, mark_pushed, to_array_record, to_config_record
from server.run_folder import RunLog
from tests.test_strategy import FP, TRAIN_NUMBERS, StubGrid, StubRun, _config, _edge_strategy, _events, _head

# A terminal escape that clears the screen, a forged log line, a right-to-left override that
# reverses what follows on screen, a zero-width space, and far too much of it.
HOSTILE = "\x1b[2J\nround 99 | accuracy 1.0000\r\u202eevil\u200b" + "x" * 50_000


def _control_characters(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c)[0] == "C" or c in "\u2028\u2029"]


def _strings(document: Any) -> list[str]:
    """Every string in a JSON document, keys included."""
    if isinstance(document, str):
        return [document]
    if isinstance(document, dict):
        return [s for key, value in document.items() for s in [*_strings(key), *_strings(value)]]
    if isinstance(document, list):
        return [s for value in document for s in _strings(value)]
    return []


class HostileGrid(StubGrid):
    """Nodes whose SuperNode names, engine answers and fallbacks are hostile text."""

    def get_nodes(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(node_id=node, name=f"board-{node}{HOSTILE}") for node in self.nodes]


@pytest.fixture(autouse=True)
def task_identity() -> None:
    act_as(0)


def test_board_text_is_one_capped_line() -> None:
    text = board_text(HOSTILE)
    assert len(text) == MAX_BOARD_TEXT and text.endswith("…") and not _control_characters(text)
    assert text.startswith("[2J round 99 | accuracy 1.0000 evil xxx")  # visible text kept, each run of controls a space
    assert board_text("onnx-int8") == "onnx-int8"  # ordinary text unchanged


def test_no_board_string_reaches_the_run_folder_or_the_log_unsafe(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: node 4 answers the backbone question with a hostile fallback
    run = StubRun(RunLog(tmp_path / "run"))
    strategy = _edge_strategy(run)
    grid = HostileGrid([1, 2, 3, 4, 5], holders={1, 2, 3, 4, 5})
    grid.fallbacks = {4: HOSTILE}
    with caplog.at_level(logging.INFO):
        sent = {
            m.metadata.dst_node_id: m
            for m in strategy.configure_train(1, to_array_record(_head(0)), _config(), grid)  # type: ignore[arg-type]
        }
        for message in sent.values():
            mark_pushed(message, message.object_id)

        # Execute: each node answers with hostile text somewhere
        replies = [
            _reply(sent[1], status={"data-notes": HOSTILE}, metrics={f"telemetry{HOSTILE}": 1.0}),
            Message(Error(code=2, reason=HOSTILE), reply_to=sent[2]),
            Message(Error(code=protocol.SETUP_ERROR_CODE, reason=HOSTILE), reply_to=sent[3]),
            _reply(sent[4], status={"engine": f"torch{HOSTILE}", "fallback": HOSTILE}),
            _reply(sent[5], status={"golden-cosine": HOSTILE}),  # malformed: quoted in the rejection
        ]
        strategy.aggregate_train(1, replies)

    # Assert
    events = _events(strategy)
    assert {e["event"] for e in events} >= {"client-reply", "client-failed", "client-rejected", "engine-fallback"}
    written = _strings(events) + _strings(run.nodes) + [r.getMessage() for r in caplog.records]
    assert any("round 99" in s for s in written)  # the hostile text did arrive ...
    for text in written:  # ... but only as capped single lines
        assert len(text) <= 2 * MAX_BOARD_TEXT + 500 and not _control_characters(text), repr(text[:200])
    for event in events:
        for key in ("reason", "notes", "board", "engine"):
            assert len(str(event.get(key, ""))) <= MAX_BOARD_TEXT


def _reply(instruction: Message, status: dict[str, object], metrics: dict[str, float] | None = None) -> Message:
    act_as(instruction.metadata.dst_node_id)
    record = to_config_record(protocol.ReplyStatus(fingerprint=FP, engine="torch", engine_fingerprint=FP))
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: Array(v) for k, v in _head(0.5).items()}),
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 10, **TRAIN_NUMBERS, **(metrics or {})}),
            protocol.STATUS: ConfigRecord({**dict(record.items()), **status}),  # type: ignore[dict-item]
        }
    )
    return Message(content, reply_to=instruction)


def test_a_status_a_board_sends_is_read_clean() -> None:
    record = protocol.ReplyStatus(fingerprint=FP, engine="torch", engine_fingerprint=FP).to_record()
    status = protocol.ReplyStatus.from_record({**record, "data-notes": HOSTILE, "fallback": "a\nb"})
    assert len(status.data_notes) == MAX_BOARD_TEXT and not _control_characters(status.data_notes)
    assert status.fallback == "a b"
    answer = protocol.BackboneStatus.from_record({"engine": "onnx\x1b[0m", "held-fingerprint": FP})
    assert answer.engine == "onnx [0m"
    assert json.dumps(status.to_record())  # and it is still a status
    assert np.isfinite(status.golden_cosine)
