"""The server's round loop in process: checkpoints and resume, retries, stopping instead of
waiting forever, screening poisoned updates, robust aggregation. A stand-in grid answers for the
clients (honest or not); the real runtime is exercised in test_faults_runtime.py."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, Krum

from common import protocol
from common.config import RunConfig
from common.flower_glue import act_as, mark_pushed, to_config_record
from server.aggregation import MultiKrumOfWhatArrived
from server.checkpoint import Checkpoint, CheckpointError, checkpoint_path
from server.edgesplit_strategy import EdgeSplitStrategy
from server.nodes import RunStopped
from server.round_loop import RoundLoop
from server.run_folder import RunLog
from server.server_run import ServerRun
from tests.test_strategy import FP, StubRun

# A client's answer to a train message: (arrays, num-examples), or None for silence, or an Error.
Behaviour = Callable[[int, int, dict[str, np.ndarray]], "tuple[dict[str, np.ndarray], int] | Error | None"]


def honest(node: int, server_round: int, start: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """A deterministic small step that depends on who and when, like real local training."""
    step = np.random.default_rng([node, server_round]).normal(0.0, 0.1, size=3).astype(np.float32)
    return {"weight": start["weight"] + step, "bias": start["bias"] + step[:2]}, 10 * node


class ClientsGrid:
    """Connected nodes that answer the backbone question and train messages as told."""

    def __init__(self, nodes: list[int], behaviour: dict[int, Behaviour] | None = None) -> None:
        self.nodes = nodes
        self.behaviour = behaviour or {}
        self.trained: list[tuple[int, int]] = []  # (round, node) per train message answered

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            mark_pushed(message, message.object_id)  # what Flower does on push
            node = message.metadata.dst_node_id
            act_as(node)
            kind = message.metadata.message_type
            if kind == MessageType.QUERY:
                status = to_config_record(protocol.BackboneStatus(engine="torch", held_fingerprint=FP))
                replies.append(Message(RecordDict({protocol.STATUS: status}), reply_to=message))
                continue
            status = to_config_record(protocol.ReplyStatus(fingerprint=FP, engine="torch", engine_fingerprint=FP))
            if kind == MessageType.EVALUATE:
                metrics = MetricRecord(
                    {protocol.NUM_EXAMPLES: 0, protocol.LOSS: 0.0, protocol.ACCURACY: 0.0, protocol.MACRO_F1: 0.0}
                )
                replies.append(
                    Message(RecordDict({protocol.METRICS: metrics, protocol.STATUS: status}), reply_to=message)
                )
                continue
            server_round = int(message.content.config_records[protocol.CONFIG][protocol.SERVER_ROUND])
            start = {k: v.numpy() for k, v in message.content.array_records[protocol.ARRAYS].items()}
            answer = self.behaviour.get(node, honest)(node, server_round, start)
            self.trained.append((server_round, node))
            if answer is None:
                continue
            if isinstance(answer, Error):
                replies.append(Message(answer, reply_to=message))
                continue
            arrays, examples = answer
            content = RecordDict(
                {
                    protocol.ARRAYS: ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()}),
                    protocol.METRICS: MetricRecord(
                        {
                            protocol.NUM_EXAMPLES: examples,
                            protocol.TRAIN_LOSS: 0.5,
                            protocol.TRAIN_ACCURACY: 0.8,
                            protocol.EMBEDDINGS_CACHED: 10_000,  # the images it holds
                        }
                    ),
                    protocol.STATUS: status,
                }
            )
            replies.append(Message(content, reply_to=message))
        return replies


@pytest.fixture(autouse=True)
def task_identity() -> None:
    act_as(0)


def _strategy(run_dir: Path, resume: bool = False, **config: object) -> RoundLoop:
    settings: dict[str, object] = {"min-clients": 2, "round-timeout": 5, **config}
    run_config = RunConfig.from_flower(settings)
    run = StubRun(RunLog(run_dir, resume=resume), config=run_config)
    if resume:
        ServerRun.resume_from(run, Checkpoint.load(run_dir))  # type: ignore[arg-type]  # the server's own restore
    return RoundLoop(EdgeSplitStrategy.for_run(run), run)  # type: ignore[arg-type]


def _events(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def _reasons(run_dir: Path) -> dict[int, str]:
    return {int(e["node"]): str(e["reason"]) for e in _events(run_dir) if e["event"] == "client-rejected"}  # type: ignore[call-overload]


# --- checkpoint and resume --------------------------------------------------------------------


def test_every_round_is_checkpointed_atomically(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path / "run", **{"num-server-rounds": 3, "strategy": "fedadam"})
    final = strategy.run_rounds(ClientsGrid([1, 2, 3]))  # type: ignore[arg-type]
    checkpoint = Checkpoint.load(tmp_path / "run")
    assert checkpoint.round == 3 and checkpoint.strategy == "fedadam"
    for name in final:
        np.testing.assert_array_equal(checkpoint.head[name], final[name])
    assert set(checkpoint.strategy_state) == {"m_t", "v_t"}  # FedAdam's moments travel with it
    assert [e["round"] for e in _events(tmp_path / "run") if e["event"] == "checkpoint"] == [1, 2, 3]
    assert [p.name for p in checkpoint_path(tmp_path / "run").parent.iterdir()] == ["latest.npz"]  # no temp left


@pytest.mark.parametrize("strategy_name", ["fedadam", "fedavg"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path: Path, strategy_name: str) -> None:
    # Half the nodes each round: the sampling RNG must resume too, not only the head and moments.
    settings = {"strategy": strategy_name, "fraction-train": 0.5, "fraction-evaluate": 0.0}
    nodes = [1, 2, 3, 4, 5, 6]
    whole = _strategy(tmp_path / "whole", **settings, **{"num-server-rounds": 5})
    expected = whole.run_rounds(ClientsGrid(nodes))  # type: ignore[arg-type]

    first = _strategy(tmp_path / "split", **settings, **{"num-server-rounds": 2})
    first.run_rounds(ClientsGrid(nodes))  # type: ignore[arg-type]  # ... and the server dies here
    second = _strategy(tmp_path / "split", resume=True, **settings, **{"num-server-rounds": 5})
    grid = ClientsGrid(nodes)
    resumed = second.run_rounds(grid)  # type: ignore[arg-type]

    assert sorted({r for r, _ in grid.trained}) == [3, 4, 5]  # nothing lost, nothing repeated
    for name in expected:
        np.testing.assert_allclose(resumed[name], expected[name], rtol=0, atol=1e-6)
    assert [r["round"] for r in Checkpoint.load(tmp_path / "split").rounds] == [1, 2, 3, 4, 5]


def test_a_checkpoint_of_another_backbone_classes_or_strategy_is_refused(tmp_path: Path) -> None:
    _strategy(tmp_path / "run", **{"num-server-rounds": 1}).run_rounds(ClientsGrid([1, 2]))  # type: ignore[arg-type]
    checkpoint = Checkpoint.load(tmp_path / "run")
    with pytest.raises(CheckpointError, match="fingerprint"):
        checkpoint.check_matches("0" * 64, ("a", "b"), "fedavg")
    with pytest.raises(CheckpointError, match="classes"):
        checkpoint.check_matches(FP, ("a", "b", "c"), "fedavg")
    with pytest.raises(CheckpointError, match="strategy='fedavg'"):
        checkpoint.check_matches(FP, ("a", "b"), "fedadam")
    checkpoint.check_matches(FP, ("a", "b"), "fedavg")  # the same setup may resume


def test_a_forged_checkpoint_is_refused_before_resuming(tmp_path: Path) -> None:
    """The head a resumed run would aggregate into must have this run's shapes, finite values,
    and a round inside the run; the error names the file and what to do."""
    shapes = {"weight": (2, 3), "bias": (2,)}

    def saved(round_: int = 2, **head: np.ndarray) -> Checkpoint:
        arrays = {"weight": np.zeros((2, 3), np.float32), "bias": np.zeros(2, np.float32), **head}
        Checkpoint(round_, arrays, FP, ("a", "b"), "fedavg", rounds=[{"round": 1}, {"round": 2}]).save(tmp_path)
        return Checkpoint.load(tmp_path)

    saved().check_content(tmp_path, shapes, num_rounds=5)  # an honest one resumes
    cases = [
        (saved(weight=np.zeros((200, 3), np.float32)), "has shape (200, 3), this run's head needs (2, 3)"),
        (saved(extra=np.zeros(2, np.float32)), "holds head arrays"),
        (saved(bias=np.array([0.0, np.nan], np.float32)), "head/bias is not a finite float array"),
        (saved(bias=np.array([1, 2], np.int64)), "head/bias is not a finite float array"),
        (saved(round_=10**6), "outside this run's rounds 1..5"),
        (saved(round_=-1), "outside this run's rounds 1..5"),
        (saved(round_=1), "round records do not match"),
    ]
    for checkpoint, says in cases:
        with pytest.raises(CheckpointError, match=re.escape(says)) as caught:
            checkpoint.check_content(tmp_path, shapes, num_rounds=5)
        assert str(checkpoint_path(tmp_path)) in str(caught.value) and "resume-from" in str(caught.value)


def test_a_missing_or_damaged_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="resume-from"):
        Checkpoint.load(tmp_path)
    path = checkpoint_path(tmp_path)
    path.parent.mkdir()
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="unreadable"):
        Checkpoint.load(tmp_path)


# --- faults: retries, stopping, bounded waiting -------------------------------------------------


def test_a_round_with_too_few_updates_is_retried(tmp_path: Path) -> None:
    lost: list[int] = []

    def flaky(node: int, server_round: int, start: dict[str, np.ndarray]) -> object:
        """Node 1's first answer in round 2 is lost; one usable update is below min-clients=2."""
        if server_round == 2 and not lost:
            lost.append(server_round)
            return None
        return honest(node, server_round, start)

    strategy = _strategy(tmp_path / "run", **{"num-server-rounds": 3, "min-clients": 2})
    strategy.run_rounds(ClientsGrid([1, 2], {1: flaky}))  # type: ignore[arg-type, dict-item]
    events = _events(tmp_path / "run")
    assert [e["round"] for e in events if e["event"] == "round-retry"] == [2]
    assert [(r.round, r.attempts, r.clients_failed) for r in strategy.run.rounds] == [(1, 1, 0), (2, 2, 1), (3, 1, 0)]


def test_a_run_that_keeps_failing_stops_with_a_message_and_keeps_its_checkpoint(tmp_path: Path) -> None:
    def dead_after_round_one(node: int, server_round: int, start: dict[str, np.ndarray]) -> object:
        return honest(node, server_round, start) if server_round == 1 else Error(code=1, reason="crashed")

    strategy = _strategy(tmp_path / "run", **{"num-server-rounds": 5, "round-retries": 1})
    with pytest.raises(RunStopped, match=r"Round 2 .* 2 attempts.*resume-from="):
        strategy.run_rounds(ClientsGrid([1, 2, 3], {2: dead_after_round_one, 3: dead_after_round_one}))  # type: ignore[arg-type, dict-item]
    assert Checkpoint.load(tmp_path / "run").round == 1  # resumable from the last good round


def test_waiting_for_nodes_that_never_come_is_bounded(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path / "run", **{"min-clients": 3, "node-wait-timeout": 1})
    started = time.monotonic()
    with pytest.raises(RunStopped, match=r"Only 2 node\(s\) connected within node-wait-timeout=1s"):
        strategy.run_rounds(ClientsGrid([1, 2]))  # type: ignore[arg-type]
    assert time.monotonic() - started < 10


# --- poisoned updates ---------------------------------------------------------------------------


def nan_update(node: int, server_round: int, start: dict[str, np.ndarray]) -> object:
    arrays, examples = honest(node, server_round, start)
    return {k: np.full_like(v, np.nan) for k, v in arrays.items()}, examples


def scaled_update(node: int, server_round: int, start: dict[str, np.ndarray]) -> object:
    arrays, examples = honest(node, server_round, start)
    return {k: start[k] + 1000 * (v - start[k]) for k, v in arrays.items()}, examples


def inflated_count(node: int, server_round: int, start: dict[str, np.ndarray]) -> object:
    arrays, examples = honest(node, server_round, start)
    return arrays, examples if server_round == 1 else 100 * examples


def test_poisoned_updates_are_rejected_with_reasons_and_never_reach_the_head(tmp_path: Path) -> None:
    nodes = list(range(1, 11))
    clean = _strategy(tmp_path / "clean", **{"num-server-rounds": 3}).run_rounds(ClientsGrid(nodes))  # type: ignore[arg-type]
    attacked = _strategy(tmp_path / "run", **{"num-server-rounds": 3, "max-update-norm": 0})  # ratio check alone
    behaviour = {3: nan_update, 5: scaled_update, 7: inflated_count}
    final = attacked.run_rounds(ClientsGrid(nodes, behaviour))  # type: ignore[arg-type, arg-type]
    reasons = _reasons(tmp_path / "run")
    assert "NaN" in reasons[3]
    assert "median" in reasons[5] and "max-update-ratio=100" in reasons[5]
    assert "num-examples 7000 is above the 70 this node first reported" in reasons[7]
    assert attacked.run.rounds[-1].clients_rejected == 3
    # Without the three, FedAvg moved less far, but never toward the attackers' numbers.
    assert np.all(np.isfinite(final["weight"]))
    assert float(np.abs(final["weight"] - clean["weight"]).max()) < 0.5


def test_a_fixed_update_bound_rejects_a_large_update(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path / "run", **{"num-server-rounds": 1, "max-update-norm": 5.0, "max-update-ratio": 0})
    strategy.run_rounds(ClientsGrid([1, 2, 3], {2: scaled_update}))  # type: ignore[arg-type, dict-item]
    assert "above max-update-norm=5" in _reasons(tmp_path / "run")[2]


@pytest.mark.parametrize(
    "name, kind", [("fedmedian", FedMedian), ("krum", Krum), ("multikrum", MultiKrumOfWhatArrived)]
)
def test_robust_aggregation_ignores_an_outlier_that_passes_the_checks(tmp_path: Path, name: str, kind: type) -> None:
    def pull(node: int, server_round: int, start: dict[str, np.ndarray]) -> object:
        return {k: v + 3.0 for k, v in start.items()}, 10 * node  # large, finite, within every bound here

    settings = {"num-server-rounds": 1, "strategy": name, "min-clients": 5, "max-update-ratio": 0}
    strategy = _strategy(tmp_path / name, **settings)
    assert type(strategy.strategy.inner) is kind
    final = strategy.run_rounds(ClientsGrid([1, 2, 3, 4, 5], {4: pull}))  # type: ignore[arg-type, dict-item]
    assert float(np.abs(final["weight"]).max()) < 1.0  # the median / Krum's pick is an honest update
    mean = _strategy(tmp_path / "fedavg", **{**settings, "strategy": "fedavg"})
    assert type(mean.strategy.inner) is FedAvg
    averaged = mean.run_rounds(ClientsGrid([1, 2, 3, 4, 5], {4: pull}))  # type: ignore[arg-type, dict-item]
    assert float(np.abs(averaged["weight"]).max()) > 0.4  # the plain average follows it


def test_multikrum_drops_the_assumed_number_after_screening(tmp_path: Path) -> None:
    """Screening removes the NaN client; Multi-Krum still drops its one most outlying update of
    the nine left, so that one attacker who passes the checks cannot hide behind one who did not."""
    settings = {"num-server-rounds": 1, "strategy": "multikrum", "min-clients": 5, "max-update-ratio": 0}
    strategy = _strategy(tmp_path / "run", **settings)
    strategy.run_rounds(ClientsGrid(list(range(1, 11)), {3: nan_update}))  # type: ignore[arg-type, dict-item]
    inner = strategy.strategy.inner
    assert isinstance(inner, MultiKrumOfWhatArrived) and inner.num_nodes_to_select == 8
