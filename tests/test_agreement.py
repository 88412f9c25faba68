"""The board holds every request to the run it agreed to (client/agreement.py): what changes the
trainable part's shape, the query, the clipping norm or the privacy floor is refused by name, and
the server records the refusal once, without retrying for it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message

from client.agreement import check_agreed, queries_of
from client.privacy_floor import Refusal
from client.request import BoardRequest
from common.config import ConfigError, RunConfig
from common.flower_glue import act_as, mark_pushed, to_array_record
from common.kinds import EventKind, HeadKind
from common.numpy_head import NumpyHead
from common.protocol import REFUSAL_CODE, Instructions, Phase
from server.run_folder import RunLog
from tests.protocol_samples import instructions
from tests.test_strategy import StubGrid, StubRun, _config, _edge_strategy, _head, _reply

# the run the sample instructions belong to: a 2-class folder run, hidden width 8, floor 2
AGREED = {"dataset": "folder", "class-names": "ok,crack", "server-test-dir": "/srv", "mlp-hidden": 8}


def _config_of(**keys: object) -> RunConfig:
    return RunConfig.from_flower({**AGREED, "ncm-min-examples": 2, "seed": 0, **keys})


def _request(asks: Phase, sent: Instructions, trainable: dict[str, np.ndarray] | None = None) -> BoardRequest:
    return BoardRequest(
        asks.value if asks in (Phase.TRAIN, Phase.EVALUATE) else "query", asks, sent, None, trainable or {}, None, None
    )


def _initial_head(config: RunConfig) -> dict[str, np.ndarray]:
    return NumpyHead.initial(config.head, 1280, 2, config.mlp_hidden, config.seed).arrays()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"mlp_hidden": 4096}, "mlp-hidden: 4096 vs 8"),
        ({"head": HeadKind.MLP}, "head: "),
        ({"num_classes": 200}, "num-classes: 200 vs 2"),
        ({"cut": 1}, "cut: 1 vs 0"),
        ({"dp_clipping_norm": 100.0}, "dp-clipping-norm: 100.0 vs 0.0"),
        ({"ncm_min_examples": 2}, None),  # the run's own floor: agreed
    ],
)
def test_instructions_that_change_the_run_are_refused_by_name(change: dict[str, object], named: str | None) -> None:
    config = _config_of()
    request = _request(Phase.TRAIN, dataclasses.replace(instructions(), **change))
    if named is None:
        check_agreed(request, config)
        return
    with pytest.raises(Refusal, match="agreed to for the run") as refused:
        check_agreed(request, config)
    assert named in str(refused.value)


def test_the_server_cannot_lower_the_floor() -> None:
    config = _config_of(**{"ncm-min-examples": 7})
    with pytest.raises(Refusal, match="ncm-min-examples: 2 is below 7"):
        check_agreed(_request(Phase.TRAIN, instructions(ncm_min_examples=2)), config)
    check_agreed(_request(Phase.TRAIN, instructions(ncm_min_examples=9)), config)  # raising it is fine


def test_a_board_answers_only_the_queries_its_run_asks() -> None:
    assert queries_of(_config_of()) == frozenset()
    assert queries_of(_config_of(**{"head-init": "ncm"})) == {Phase.CLASS_SUMS}
    assert queries_of(_config_of(**{"head-init": "lda"})) == {Phase.RIDGE_SUMS}
    assert queries_of(_config_of(**{"class-balance": "weighted"})) == {Phase.CLASS_COUNTS}
    assert queries_of(_config_of(**{"dp-clipping-norm": 1.0})) == frozenset()  # nothing un-noised in a DP run
    random_run, lda_run = _config_of(), _config_of(**{"head-init": "lda"})
    for asks in (Phase.RIDGE_SUMS, Phase.CLASS_SUMS, Phase.CLASS_COUNTS):
        with pytest.raises(Refusal, match=f"asks no {asks}"):
            check_agreed(_request(asks, instructions(), _initial_head(random_run)), random_run)
    check_agreed(_request(Phase.RIDGE_SUMS, instructions(), _initial_head(lda_run)), lda_run)


def test_statistics_are_only_of_the_runs_own_initial_head() -> None:
    """A crafted first layer could make each hidden unit fire for one image: the board sums only
    what the run's own seeded head sees."""
    config = _config_of(**{"head-init": "lda", "head": "mlp"})
    sent = instructions(head=HeadKind.MLP)
    check_agreed(_request(Phase.RIDGE_SUMS, sent, _initial_head(config)), config)
    crafted = _initial_head(config)
    crafted["classifier.0.weight"] = np.eye(8, 1280, dtype=np.float32) * 100
    with pytest.raises(Refusal, match="must carry the run's initial head"):
        check_agreed(_request(Phase.RIDGE_SUMS, sent, crafted), config)


def test_a_dp_run_refuses_every_un_noised_count() -> None:
    for keys in ({"class-balance": "weighted"}, {"local-prior-correction": True}, {"head-init": "lda"}):
        with pytest.raises(ConfigError, match="without noise"):
            RunConfig.from_flower({"dp-clipping-norm": 1.0, **keys})


def test_the_server_records_a_refusal_once_and_goes_on(tmp_path: Path) -> None:
    act_as(0)
    strategy = _edge_strategy(StubRun(RunLog(tmp_path / "run")))
    grid = StubGrid([1, 2], holders={1, 2})
    for server_round in (1, 2):
        sent = {
            m.metadata.dst_node_id: m
            for m in strategy.configure_train(server_round, to_array_record(_head(0)), _config(), grid)
        }  # type: ignore[arg-type]
        for message in sent.values():
            mark_pushed(message)
        act_as(2)
        refusal = Message(Error(code=REFUSAL_CODE, reason="refused: mlp-hidden: 4096 vs 8"), reply_to=sent[2])
        act_as(0)
        strategy.aggregate_train(server_round, [_reply(sent[1], _head(0.5)), refusal])
    assert strategy.screen.setup_errors == {2: "refused: mlp-hidden: 4096 vs 8"}  # not retried for
    strategy.run_log.close()
    events = (tmp_path / "run" / "events.jsonl").read_text()
    assert events.count("refused: mlp-hidden: 4096 vs 8") == 1 and EventKind.CLIENT_FAILED.value in events
