"""The fault-injection mod: faults happen around the handlers, never inside the training code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from client.faults import SCALE, InjectedFault, fault_injector
from client.state import ProcessState
from common.flower_glue import act_as, from_array_record, to_array_record, to_config_record
from common.protocol import ARRAYS, CONFIG
from tests.conftest import write_image_folder
from tests.protocol_samples import instructions

START = {"weight": np.zeros((2, 3), np.float32), "bias": np.ones(2, np.float32)}
TRAINED = {"weight": np.full((2, 3), 0.1, np.float32), "bias": np.full(2, 1.2, np.float32)}


@pytest.fixture(autouse=True)
def node_identity() -> None:
    """Flower stamps messages with the running task's identity (its runtime sets it)."""
    act_as(1)


def _context(tmp_path: Path, faults: str, partition: int | None = 0) -> Context:
    data = write_image_folder(tmp_path / "data", {"ok": 3, "crack": 5}, seed=0)
    run = {
        "dataset": "folder",
        "class-names": "ok,crack",
        "server-test-dir": str(data),
        "client-test-fraction": 0.0,
        "fault-clients": faults,
        "fault-delay": 0.0,
    }
    node = {"data-dir": str(data)} | ({"partition-id": partition, "num-partitions": 2} if partition is not None else {})
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=run)


def _message(kind: str = MessageType.TRAIN) -> Message:
    content = RecordDict({ARRAYS: to_array_record(START), CONFIG: to_config_record(instructions())})
    return Message(content=content, dst_node_id=1, message_type=kind)


class Handler:
    """Stands in for a ClientApp handler: records the labels its client would train on."""

    def __init__(self, state: ProcessState) -> None:
        self.state, self.labels = state, list[tuple[int, ...]]()

    def __call__(self, msg: Message, context: Context) -> Message:
        self.labels.append(self.state.client(context.run_config, context.node_config).data.train.labels)
        return Message(content=RecordDict({ARRAYS: to_array_record(TRAINED)}), reply_to=msg)


def _run(tmp_path: Path, faults: str, kind: str = MessageType.TRAIN, **node: int | None) -> tuple[Handler, Message]:
    state = ProcessState()
    handler = Handler(state)
    reply = fault_injector(state)(_message(kind), _context(tmp_path, faults, **node), handler)
    return handler, reply


def _sent(reply: Message) -> dict[str, np.ndarray]:
    return from_array_record(reply.content.array_records[ARRAYS])


def test_nan_update_poisons_the_outgoing_arrays(tmp_path: Path) -> None:
    _, reply = _run(tmp_path, "0:nan-update")
    assert all(np.isnan(value).all() for value in _sent(reply).values())


def test_scaled_update_scales_the_honest_update_against_the_start(tmp_path: Path) -> None:
    _, reply = _run(tmp_path, "0:scaled-update")
    np.testing.assert_allclose(_sent(reply)["bias"], 1.0 + SCALE * 0.2, rtol=1e-5)


def test_label_flip_trains_on_flipped_labels_and_then_restores_them(tmp_path: Path) -> None:
    state = ProcessState()
    handler = Handler(state)
    context = _context(tmp_path, "0:label-flip")
    honest = state.client(context.run_config, context.node_config).data.train.labels
    reply = fault_injector(state)(_message(), context, handler)
    assert handler.labels == [tuple(1 - label for label in honest)]  # C - 1 - y with C = 2
    assert state.client(context.run_config, context.node_config).data.train.labels == honest
    np.testing.assert_array_equal(_sent(reply)["bias"], TRAINED["bias"])  # the update itself is honest
    fault_injector(state)(_message(MessageType.EVALUATE), context, handler)
    assert handler.labels[-1] == honest  # evaluation is honest


@pytest.mark.parametrize("fault", ["crash", "dropout"])
def test_crash_and_dropout_raise_before_any_work(tmp_path: Path, fault: str) -> None:
    state = ProcessState()
    handler = Handler(state)
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        with pytest.raises(InjectedFault, match=fault):
            fault_injector(state)(_message(kind), _context(tmp_path, f"0:{fault}"), handler)
    assert handler.labels == []


def test_no_fault_without_a_partition_id_or_on_evaluate(tmp_path: Path) -> None:
    _, reply = _run(tmp_path, "0:nan-update", partition=None)  # a real board commits none
    np.testing.assert_array_equal(_sent(reply)["weight"], TRAINED["weight"])
    _, reply = _run(tmp_path, "0:nan-update", kind=MessageType.EVALUATE)  # poisons only updates
    np.testing.assert_array_equal(_sent(reply)["weight"], TRAINED["weight"])


def test_other_messages_pass_untouched(tmp_path: Path) -> None:
    _, reply = _run(tmp_path, "0:crash", kind=MessageType.QUERY)
    np.testing.assert_array_equal(_sent(reply)["weight"], TRAINED["weight"])
