"""The server strategy's own logic, in process: which nodes get the backbone, and which replies
may reach the aggregate. A stand-in grid and run record replace the runtime here; the real
runtime is exercised in test_flower_runtime.py."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common import protocol
from common.config import RunConfig
from common.engines import ENGINE_KINDS, EngineKind
from common.flower_glue import (
    act_as,
    from_array_record,
    mark_pushed,
    set_source_node,
    to_array_record,
    to_config_record,
)
from common.kinds import EventKind
from common.protocol import GoldenBatch, Instructions, Phase
from server.checkpoint import Checkpoint
from server.edgesplit_strategy import EdgeSplitStrategy
from server.ledger import EmbeddingLedger, RoundRecord
from server.nodes import RunStopped
from server.run_folder import RunLog
from tests.protocol_samples import instructions as sample_instructions

FP = "f" * 64
SHAPES = {"weight": (2, 3), "bias": (2,)}
TORCH = ENGINE_KINDS["torch"]


class StubVariants:
    """Engine variants of the backbone: the torch one is the backbone itself."""

    fingerprint, cut = FP, 0

    def variant_fingerprint(self, kind: EngineKind | str) -> str:
        name = kind if isinstance(kind, str) else kind.name
        return FP if name == TORCH.name else hashlib.sha256(f"{name}|{FP}".encode()).hexdigest()

    def artifact(self, kind: EngineKind) -> object:
        return {"w": torch.ones(4)} if kind is TORCH else f"ONNX model for {kind.name}".encode()

    def golden(self) -> GoldenBatch:
        return GoldenBatch(images=np.zeros((2, 3, 4, 4), np.float16), features=np.ones((2, 8), np.float32))


@dataclass
class StubRun:
    """The parts of ServerRun the strategy and the round loop touch."""

    run_log: RunLog
    config: RunConfig = field(default_factory=lambda: RunConfig(min_clients=1))
    fingerprint: str = FP
    engine: EngineKind = TORCH
    variants: StubVariants = field(default_factory=lambda: StubVariants())
    classes: tuple[str, ...] = ("a", "b")
    checkpoint: Checkpoint | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    embedding: EmbeddingLedger = field(default_factory=EmbeddingLedger)
    nodes: dict[int, dict[str, Any]] = field(default_factory=dict)
    class_counts: tuple[int, ...] = ()
    dp_releases: list[float] = field(default_factory=list)

    def head_shapes(self) -> dict[str, tuple[int, ...]]:
        return SHAPES

    def class_stats_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"sums": (2, 3), "counts": (2,)}

    def ridge_stats_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"gram": (6,), "sums": (2, 3), "counts": (2,)}

    @property
    def start_round(self) -> int:
        return self.checkpoint.round if self.checkpoint else 0

    @property
    def start_head(self) -> dict[str, np.ndarray]:
        return dict(self.checkpoint.head) if self.checkpoint else _head(0.0)

    def instructions(self, server_round: int, phase: Phase = Phase.TRAIN) -> Instructions:
        return instructions(server_round)

    def evaluate(self, arrays: dict[str, np.ndarray]) -> SimpleNamespace:
        """Stands for central accuracy: the mean weight, so a test can tell heads apart."""
        accuracy = float(arrays["weight"].mean())
        return SimpleNamespace(accuracy=accuracy, macro_f1=0.0, balanced_accuracy=0.0, per_class_recall=[], loss=0.0)

    def record_round(self, record: RoundRecord, report: SimpleNamespace) -> None:
        record.accuracy = report.accuracy
        self.rounds.append(record)
        self.run_log.event(EventKind.ROUND_END, round=record.round, accuracy=record.accuracy)


def instructions(server_round: int = 1) -> Instructions:
    return sample_instructions(server_round=server_round, fingerprint=FP, engine_fingerprint=FP)


def _config(server_round: int = 1) -> ConfigRecord:
    return to_config_record(instructions(server_round))


class StubGrid:
    """Connected nodes, and canned answers to the backbone-status question."""

    def __init__(self, nodes: list[int], holders: set[int], engines: dict[int, str] | None = None) -> None:
        self.nodes, self.holders, self.questions = nodes, holders, []
        self.engines = engines or {}
        self.held: dict[int, str] = {}  # node -> a variant it holds, overriding ``holders``
        self.fallbacks: dict[int, str] = {}  # node -> why it runs a safer engine (client/golden.py)

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for question in messages:
            node = question.metadata.dst_node_id
            self.questions.append(node)
            act_as(node)
            engine = self.engines.get(node, "torch")
            held = StubVariants().variant_fingerprint(engine) if node in self.holders else ""
            fallback = self.fallbacks.get(node, "")
            answer = protocol.BackboneStatus(
                engine=engine, held_fingerprint=self.held.get(node, held), fallback=fallback
            )
            replies.append(Message(RecordDict({protocol.STATUS: to_config_record(answer)}), reply_to=question))
        return replies


@pytest.fixture(autouse=True)
def task_identity() -> None:
    act_as(0)


def _edge_strategy(run: StubRun) -> EdgeSplitStrategy:
    inner = FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
    return EdgeSplitStrategy.for_run(run, inner)  # type: ignore[arg-type]


@pytest.fixture
def strategy(tmp_path: Path) -> EdgeSplitStrategy:
    return _edge_strategy(StubRun(RunLog(tmp_path / "run")))


def _head(value: float) -> dict[str, np.ndarray]:
    return {"weight": np.full((2, 3), value, np.float32), "bias": np.full(2, value, np.float32)}


# what every train reply reports (the node's own image count bounds its num-examples)
TRAIN_NUMBERS = {protocol.TRAIN_LOSS: 0.5, protocol.TRAIN_ACCURACY: 0.8, protocol.EMBEDDINGS_CACHED: 1000}


def _reply(instruction: Message, arrays: dict[str, np.ndarray], num_examples: object = 10, fp: str = FP) -> Message:
    act_as(instruction.metadata.dst_node_id)
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: num_examples, **TRAIN_NUMBERS}),  # type: ignore[dict-item]
            protocol.STATUS: to_config_record(
                protocol.ReplyStatus(fingerprint=fp, engine="torch", engine_fingerprint=fp)
            ),
        }
    )
    return Message(content, reply_to=instruction)


def _events(strategy: EdgeSplitStrategy) -> list[dict[str, object]]:
    strategy.run_log.close()
    return [json.loads(line) for line in (strategy.run_log.run_dir / "events.jsonl").read_text().splitlines()]


def test_backbone_goes_only_to_nodes_that_lack_it_and_only_once(strategy: EdgeSplitStrategy) -> None:
    grid = StubGrid([1, 2, 3], holders={2})
    first = list(strategy.configure_train(1, to_array_record(_head(0)), _config(), grid))  # type: ignore[arg-type]
    with_backbone = {m.metadata.dst_node_id for m in first if protocol.BACKBONE in m.content.array_records}
    assert with_backbone == {1, 3}
    assert sorted(grid.questions) == [1, 2, 3]
    second = list(strategy.configure_train(2, to_array_record(_head(0)), _config(), grid))  # type: ignore[arg-type]
    assert not [m for m in second if protocol.BACKBONE in m.content.array_records]
    assert sorted(grid.questions) == [1, 2, 3]  # nobody asked twice


def test_nodes_are_met_once_before_round_1_so_round_1_sends_only_its_own_messages(strategy: EdgeSplitStrategy) -> None:
    grid = StubGrid([1, 2, 3], holders={2}, engines={1: "onnx-int8"})
    strategy.meet(grid)  # type: ignore[arg-type]
    assert sorted(grid.questions) == [1, 2, 3]
    first = list(strategy.configure_train(1, to_array_record(_head(0)), _config(), grid))  # type: ignore[arg-type]
    assert sorted(grid.questions) == [1, 2, 3]  # nobody asked again in round 1
    with_backbone = {m.metadata.dst_node_id: m for m in first if protocol.BACKBONE in m.content.array_records}
    assert set(with_backbone) == {1, 3}
    told = Instructions.from_record(with_backbone[1].content.config_records[protocol.CONFIG])
    assert told.engine == "onnx-int8"
    met = [e for e in _events(strategy) if e["event"] == "nodes-met"]
    assert [(e["asked"], e["answered"]) for e in met] == [(3, 3)]


def test_each_node_gets_the_variant_of_the_engine_it_runs(strategy: EdgeSplitStrategy) -> None:
    grid = StubGrid([1, 2, 3, 4], holders={3}, engines={1: "onnx-int8", 2: "onnx", 3: "onnx-int8"})
    grid.held[4] = "a-variant-this-server-no-longer-makes"
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_array_record(_head(0)), _config(), grid)}  # type: ignore[arg-type]
    variants = StubVariants()
    for node, engine in {1: "onnx-int8", 2: "onnx", 3: "onnx-int8", 4: "torch"}.items():
        told = Instructions.from_record(sent[node].content.config_records[protocol.CONFIG])
        assert (told.engine, told.engine_fingerprint) == (
            engine,
            variants.variant_fingerprint(engine),
        )
    model = sent[1].content.array_records[protocol.BACKBONE][protocol.ONNX_MODEL].numpy().tobytes()
    assert model == variants.artifact(ENGINE_KINDS["onnx-int8"])
    assert set(sent[2].content.array_records[protocol.BACKBONE]) == {protocol.ONNX_MODEL}
    assert protocol.BACKBONE not in sent[3].content.array_records  # holds the int8 variant already
    assert set(sent[4].content.array_records[protocol.BACKBONE]) == {"w"}  # stale copy: the weights again
    assert strategy.tally.record.backbones_sent == 3


def test_a_node_that_failed_is_asked_again(strategy: EdgeSplitStrategy) -> None:
    grid = StubGrid([1, 2], holders=set())
    messages = list(strategy.configure_train(1, to_array_record(_head(0)), _config(), grid))  # type: ignore[arg-type]
    sent = {m.metadata.dst_node_id: m for m in messages}
    act_as(2)
    failed = Message(Error(code=1, reason="disk full"), reply_to=sent[2])
    strategy.aggregate_train(1, [_reply(sent[1], _head(0.5)), failed])
    list(strategy.configure_train(2, to_array_record(_head(0)), _config(), grid))  # type: ignore[arg-type]
    assert grid.questions.count(2) == 2 and grid.questions.count(1) == 1


def test_a_silent_node_counts_as_failed_and_too_few_replies_keep_the_head(tmp_path: Path) -> None:
    strategy = _edge_strategy(StubRun(RunLog(tmp_path / "run"), config=RunConfig(min_clients=2, round_timeout=5)))
    grid = StubGrid([1, 2, 3], holders={1, 2, 3})
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_array_record(_head(0)), _config(), grid)}  # type: ignore[arg-type]
    arrays, _ = strategy.aggregate_train(1, [_reply(sent[1], _head(0.5))])  # 2 and 3 never answer
    assert arrays is None  # one usable update is below min-clients=2
    record: RoundRecord = strategy.tally.record
    assert (record.clients_ok, record.clients_failed) == (1, 2)
    events = _events(strategy)
    silent = [e for e in events if e["event"] == "client-failed"]
    assert sorted(e["node"] for e in silent) == [2, 3]  # type: ignore[type-var]
    assert all("round-timeout=5s" in str(e["reason"]) for e in silent)
    assert [e["usable"] for e in events if e["event"] == "round-skipped"] == [1]


def test_only_well_formed_replies_reach_the_aggregate(strategy: EdgeSplitStrategy) -> None:
    grid = StubGrid([1, 2, 3, 4, 5, 6], holders={1, 2, 3, 4, 5, 6})
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_array_record(_head(0)), _config(), grid)}  # type: ignore[arg-type]
    nan_head = _head(1.0)
    nan_head["bias"][0] = np.nan
    act_as(6)
    replies = [
        _reply(sent[1], _head(0.5)),
        _reply(sent[2], nan_head),
        _reply(sent[3], _head(1000.0) | {"weight": np.full((2, 3), 1e6, np.float32)}),
        _reply(sent[4], _head(1.0), fp="0" * 64),
        _reply(sent[5], _head(1.0), num_examples=float("nan")),
        Message(Error(code=1, reason="killed"), reply_to=sent[6]),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    aggregate = from_array_record(arrays)
    np.testing.assert_array_equal(aggregate["weight"], _head(0.5)["weight"])  # the good reply alone
    record: RoundRecord = strategy.tally.record
    assert (record.clients_ok, record.clients_rejected, record.clients_failed) == (1, 4, 1)
    reasons = [e["reason"] for e in _events(strategy) if e["event"] == "client-rejected"]
    assert len(reasons) == 4
    assert any("NaN" in r for r in reasons) and any("norm" in r for r in reasons)
    assert any("fingerprint" in r for r in reasons) and any("num-examples" in r for r in reasons)


def test_an_error_the_superlink_sends_for_a_dead_node_counts_against_that_node(strategy: EdgeSplitStrategy) -> None:
    grid = StubGrid([7, 8], holders={7, 8})
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_array_record(_head(0)), _config(), grid)}  # type: ignore[arg-type]
    for message in sent.values():  # what Flower's grid does when it pushes a message
        mark_pushed(message, message.object_id)
    unavailable = Message(Error(code=5, reason="Node Unavailable"), reply_to=sent[8])
    set_source_node(unavailable, 1)  # the SuperLink answers for a node without heartbeat
    strategy.aggregate_train(1, [_reply(sent[7], _head(0.5)), unavailable])
    failed = [e for e in _events(strategy) if e["event"] == "client-failed"]
    assert [(e["node"], e["reason"]) for e in failed] == [(8, "Node Unavailable")]
    assert strategy.tally.record.clients_failed == 1


def test_a_node_that_cannot_take_part_is_reported_once_and_stops_the_run_only_when_too_few_can(
    tmp_path: Path,
) -> None:
    strategy = _edge_strategy(StubRun(RunLog(tmp_path / "run"), config=RunConfig(min_clients=2)))
    grid = StubGrid([1, 2, 3], holders={1, 2, 3})
    no_folder = "DataError: Data folder '/boards/3/data' does not exist."
    for server_round in (1, 2):  # node 3 says the same twice: reported once, the rounds go on
        sent = {
            m.metadata.dst_node_id: m
            for m in strategy.configure_train(server_round, to_array_record(_head(0)), _config(server_round), grid)  # type: ignore[arg-type]
        }
        act_as(3)
        cannot = Message(Error(code=protocol.SETUP_ERROR_CODE, reason=no_folder), reply_to=sent[3])
        arrays, _ = strategy.aggregate_train(
            server_round, [_reply(sent[1], _head(0.5)), _reply(sent[2], _head(0.5)), cannot]
        )
        assert arrays is not None and strategy.tally.record.clients_failed == 1

    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(3, to_array_record(_head(0)), _config(3), grid)}  # type: ignore[arg-type]
    act_as(2)
    other = Message(
        Error(code=protocol.SETUP_ERROR_CODE, reason="DataError: no usable training images"), reply_to=sent[2]
    )
    act_as(3)
    again = Message(Error(code=protocol.SETUP_ERROR_CODE, reason=no_folder), reply_to=sent[3])
    with pytest.raises(RunStopped) as stopped:  # 1 of 3 can take part, min-clients=2: no retry can help
        strategy.aggregate_train(3, [_reply(sent[1], _head(0.5)), other, again])
    assert "leaving 1, fewer than min-clients=2" in str(stopped.value)
    assert no_folder in str(stopped.value) and "no usable training images" in str(stopped.value)
    reported = [e for e in _events(strategy) if e["event"] == "client-failed"]
    assert [(e["round"], e["node"], e["setup_error"]) for e in reported] == [(1, 3, True), (3, 2, True)]


def test_the_config_accepts_exactly_the_strategies_in_the_table() -> None:
    from flwr.serverapp.strategy import Strategy

    from common.config import ConfigError
    from common.kinds import StrategyName
    from server.aggregation import STRATEGIES, make_inner_strategy

    assert set(STRATEGIES) == set(StrategyName)
    for name in StrategyName:
        config = RunConfig.from_flower({"strategy": name, "min-clients": 5})
        assert isinstance(make_inner_strategy(config), Strategy)
    with pytest.raises(ConfigError, match="must be one of"):
        RunConfig.from_flower({"strategy": "fedsgd"})


def test_a_node_repeating_its_embedding_counts_is_counted_once(strategy: EdgeSplitStrategy) -> None:
    grid = StubGrid([1, 2], holders={1, 2})
    for server_round in (1, 2):  # both rounds' replies carry the same counts: the work was done once
        sent = {
            m.metadata.dst_node_id: m
            for m in strategy.configure_train(server_round, to_array_record(_head(0)), _config(server_round), grid)
        }
        replies = []
        for node, message in sent.items():
            reply = _reply(message, _head(0.1))
            reply.content[protocol.METRICS][protocol.EMBEDDINGS_COMPUTED] = 10 * node
            reply.content[protocol.METRICS][protocol.EMBEDDINGS_CACHED] = 1
            replies.append(reply)
        strategy.aggregate_train(server_round, replies)
    ledger = strategy.screen.embedding  # the run's
    assert (ledger.computed, ledger.cached) == (30, 2)


def _with_metrics(reply: Message, **extra: object) -> Message:
    metrics = dict(reply.content[protocol.METRICS].items())
    reply.content[protocol.METRICS] = MetricRecord({**metrics, **extra})  # type: ignore[dict-item]
    return reply


def test_a_mixed_fleet_aggregates_and_odd_metrics_are_normalised_or_rejected(strategy: EdgeSplitStrategy) -> None:
    """One board reports its CPU temperature, one an extra metric, one an infinite count, one a
    second metric record: Flower's strategies refuse replies whose metric keys differ, so the
    screen hands them exactly the averaged keys and keeps the rest in the event log."""
    grid = StubGrid([1, 2, 3, 4, 5], holders={1, 2, 3, 4, 5})
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_array_record(_head(0)), _config(), grid)}  # type: ignore[arg-type]
    two_records = _reply(sent[5], _head(1.0))
    two_records.content["more-metrics"] = MetricRecord({"x": 1.0})
    replies = [
        _with_metrics(_reply(sent[1], _head(0.5)), **{protocol.CPU_TEMP_C: 61.5}),
        _with_metrics(_reply(sent[2], _head(1.5)), **{"debug-counter": 3}),
        _with_metrics(_reply(sent[3], _head(1.0)), **{protocol.EMBEDDINGS_COMPUTED: float("inf")}),
        _with_metrics(_reply(sent[4], _head(1.0)), **{protocol.TRAIN_LOSS: [0.1, 0.2]}),
        two_records,
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(from_array_record(arrays)["weight"], np.full((2, 3), 1.0, np.float32), rtol=1e-6)
    assert set(metrics) == {protocol.TRAIN_LOSS, protocol.TRAIN_ACCURACY}  # Flower averaged exactly these
    record: RoundRecord = strategy.tally.record
    assert (record.clients_ok, record.clients_rejected) == (3, 2)
    events = _events(strategy)
    reasons = {e["node"]: e["reason"] for e in events if e["event"] == "client-rejected"}
    assert "embeddings-computed" in str(reasons[3]) and "train-loss" in str(reasons[4])
    logged = {e["node"]: e["metrics"] for e in events if e["event"] == "client-reply"}
    assert logged[1][protocol.CPU_TEMP_C] == 61.5 and logged[2]["debug-counter"] == 3  # type: ignore[index]


def test_a_node_failing_its_golden_check_is_refused_then_gets_the_safer_variant(strategy: EdgeSplitStrategy) -> None:
    """Server side of the golden check (client/golden.py): the golden batch goes with the variant;
    a reply whose engine failed it is refused with the reason and the node is asked again, and its
    answer (the safer engine and why) gets it that engine's variant."""
    grid = StubGrid([1, 2], holders=set(), engines={1: "onnx-int8", 2: "onnx-int8"})
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_array_record(_head(0)), _config(), grid)}  # type: ignore[arg-type]
    for message in sent.values():
        golden = from_array_record(message.content.array_records[protocol.GOLDEN])
        np.testing.assert_array_equal(golden["features"], StubVariants().golden().features)
    why = "client 1: the onnx-int8 engine computes ... at mean cosine 0.6100; this node falls back to the onnx engine"
    failed = _reply(sent[1], _head(0.5))
    status = protocol.ReplyStatus(FP, "onnx-int8", "x", golden_cosine=0.61, fallback=why)
    failed.content[protocol.STATUS] = to_config_record(status)
    passed = _reply(sent[2], _head(0.5))
    arm = protocol.ReplyStatus(FP, "onnx-int8", "x", golden_cosine=0.995, machine="aarch64")
    passed.content[protocol.STATUS] = to_config_record(arm)
    arrays, _ = strategy.aggregate_train(1, [failed, passed])
    assert arrays is not None and strategy.tally.record.clients_rejected == 1
    nodes = strategy.screen.nodes  # the run's (summary.json's "nodes")
    assert nodes[1] == {"engine": "onnx-int8", "machine": "", "golden_cosine": 0.61, "fallback": why, "refused": True}
    assert nodes[2]["golden_cosine"] == 0.995 and not nodes[2]["refused"] and nodes[2]["machine"] == "aarch64"

    grid.engines[1] = "onnx"  # what node 1 answers now: client/golden.py's fallback
    grid.fallbacks = {1: "onnx-int8 golden cosine 0.6100 < golden-min-cosine 0.98; runs onnx"}
    again = {
        m.metadata.dst_node_id: m for m in strategy.configure_train(2, to_array_record(_head(0)), _config(2), grid)
    }  # type: ignore[arg-type]
    told = Instructions.from_record(again[1].content.config_records[protocol.CONFIG])
    assert told.engine == "onnx" and protocol.BACKBONE in again[1].content.array_records
    assert protocol.BACKBONE not in again[2].content.array_records
    events = _events(strategy)
    refused = [e for e in events if e["event"] == "client-rejected"]
    assert len(refused) == 1 and "golden check failed" in refused[0]["reason"] and refused[0]["golden_cosine"] == 0.61
    fallback = [e for e in events if e["event"] == "engine-fallback"]
    assert [(e["node"], e["engine"]) for e in fallback] == [(1, "onnx")] and "runs onnx" in fallback[0]["reason"]


def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in(tmp_path: Path) -> None:
    heads = [
        _head(v) | {"weight": np.random.default_rng(i).normal(size=(2, 3)).astype(np.float32)}
        for i, v in enumerate((0.1, 0.7, 1e-3))
    ]
    results = []
    for order in ((0, 1, 2), (2, 0, 1), (1, 2, 0)):
        strategy = _edge_strategy(StubRun(RunLog(tmp_path / f"run{order}")))
        grid = StubGrid([1, 2, 3], holders={1, 2, 3})
        sent = {
            m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_array_record(_head(0)), _config(), grid)
        }  # type: ignore[arg-type]
        replies = [_reply(sent[i + 1], heads[i], num_examples=7 + 5 * i) for i in order]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        results.append({k: v.tobytes() for k, v in from_array_record(arrays).items()})
    assert results[0] == results[1] == results[2]  # bit for bit: float sums follow the content, not arrival


def test_a_first_claim_far_above_the_median_is_refused_except_in_a_dp_run(tmp_path: Path) -> None:
    """num-examples buys weight in FedAvg: a node's first claim may be at most 100x the round's
    median. A DP run averages updates with equal weights, and its verdicts must not depend on
    the other nodes' claims, so there the claim is only held to the node's own bounds."""
    for dp, expected in ((0.0, (3, 1)), (2.0, (4, 0))):
        config = RunConfig(min_clients=1, dp_clipping_norm=dp)
        strategy = _edge_strategy(StubRun(RunLog(tmp_path / f"run-{dp}"), config=config))
        grid = StubGrid([1, 2, 3, 4], holders={1, 2, 3, 4})
        sent = {
            m.metadata.dst_node_id: m for m in strategy.configure_train(1, to_array_record(_head(0)), _config(), grid)
        }  # type: ignore[arg-type]
        claims = {1: 5, 2: 5, 3: 5, 4: 999}  # below the 1000 images each says it holds
        strategy.aggregate_train(1, [_reply(sent[n], _head(0.1), num_examples=c) for n, c in claims.items()])
        record: RoundRecord = strategy.tally.record
        assert (record.clients_ok, record.clients_rejected) == expected
    reasons = [e["reason"] for e in _events_of(tmp_path / "run-0.0") if e["event"] == "client-rejected"]
    assert reasons == ["num-examples 999 is 200x the round's median 5 (at most 100x for a node's first reply)"]


def _events_of(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
