"""FedNCM and personal heads on a pathological split of generated images: 10 classes, 10 clients
holding 2 classes each. In process: the real ServerRun, strategy and round loop, and the real
ClientApp handlers (privacy guard included) behind a grid that delivers each message by calling
them. (simulations/pathological.py runs the same through the Flower runtime for BENCHMARKS.md.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from client import app as client_app
from common.config import MIN_GRAM_ENV, RunConfig
from common.flower_glue import act_as, mark_pushed
from deploy.reference_probe import centralised_probe
from server.edgesplit_strategy import EdgeSplitStrategy
from server.round_loop import RoundLoop
from server.server_run import ServerRun
from simulations.pathological import CLASSES, rounds_to_stay, rounds_to_target, run_config, write_pathological_data

CLIENTS = 10
ROUNDS = 4
HANDLERS = {"train": client_app.train, "evaluate": client_app.evaluate, "query": client_app.query}


class InProcessGrid:
    """Nodes 1..10, each the ClientApp of simulated partition node - 1, answering by function call."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": CLIENTS},
                state=RecordDict(),
                run_config=config,
            )
            for node in range(1, CLIENTS + 1)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            mark_pushed(message, message.object_id)  # what Flower does on push
            node = message.metadata.dst_node_id
            act_as(node)
            handler = HANDLERS[message.metadata.message_type]
            replies.append(client_app.privacy_guard(message, self.contexts[node], handler))
        return replies


@pytest.fixture(scope="module")
def federations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same pathological federation twice, head initialised at random and by FedNCM; and
    the federation's LDA head from Fed3R's statistics alone (no round), then fine-tuned. Each
    board holds some 50 training images, far below the Gram floor of the feature dimension: as
    its operator may, each lets its clear Gram go from 2 images (client/privacy_floor.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MIN_GRAM_ENV, "2")
        return _federations(tmp_path_factory)


def _federations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    act_as(0)  # as the ServerApp's runtime sets
    tmp = tmp_path_factory.mktemp("pathological")
    root = write_pathological_data(tmp / "data", clients=CLIENTS, per_class=30, test_per_class=8)
    results: dict[str, Any] = {}
    for name, init, rounds, more in (
        ("random", "random", ROUNDS, {}),
        ("ncm", "ncm", ROUNDS, {}),
        ("lda", "lda", 0, {}),
        ("lda+ft", "lda", 2, {}),
        # each board corrects for its own label shares: the prior from one counts-only query
        ("counts", "random", 1, {"local-prior-correction": True}),
    ):
        settings = run_config(
            root,
            tmp / "cache",
            tmp / "runs",
            name,
            # half of each client's images are its local test share: enough to compare two heads on
            **{
                "head-init": init,
                "num-server-rounds": rounds,
                "engine": "torch",
                "client-test-fraction": 0.5,
                **more,
            },
        )
        config = RunConfig.from_flower(settings)
        run = ServerRun.prepare(config)
        RoundLoop(EdgeSplitStrategy.for_run(run), run).run_rounds(InProcessGrid(settings))  # type: ignore[arg-type]
        events = [json.loads(line) for line in (run.run_log.run_dir / "events.jsonl").read_text().splitlines()]
        results[name] = {
            "instructions": run.instructions(1) if rounds else None,  # what round 1 told the boards
            "rounds": run.rounds,
            "initial": next(e["accuracy"] for e in events if e["event"] == "initial-evaluation"),
            "events": events,
        }
    # one C (what the full grid picks here): the grid's 15 cross-validation fits cost ~15 s of CPU
    results["probe"] = centralised_probe(config, CLIENTS, c_grid=(0.3,)).accuracy
    return results


def test_fedncm_reaches_the_probe_plateau_in_fewer_rounds(federations: dict[str, Any]) -> None:
    target = federations["probe"] - 0.02
    reached = {}
    for init in ("random", "ncm"):
        accuracy = [r.accuracy for r in federations[init]["rounds"]]
        found = rounds_to_target(accuracy, federations[init]["initial"], target)
        reached[init] = ROUNDS + 1 if found is None else found
    print(f"probe {federations['probe']:.3f}, rounds to {target:.3f}: {reached}")  # shown with -s
    assert federations["probe"] > 0.8  # the classes are learnable from the frozen features
    assert reached["ncm"] < reached["random"]
    init = [e for e in federations["ncm"]["events"] if e["event"] == "head-initialised"]
    assert len(init) == 1 and init[0]["nodes"] == CLIENTS and init[0]["classes_set"] == list(range(len(CLASSES)))
    assert not [e for e in federations["random"]["events"] if e["event"] == "head-initialised"]


def test_the_federated_lda_head_starts_at_the_probe_plateau_without_held_out_data(federations: dict[str, Any]) -> None:
    lda = federations["lda"]
    assert lda["initial"] >= federations["probe"] - 0.02
    (init,) = [e for e in lda["events"] if e["event"] == "head-initialised"]
    assert init["method"] == "lda" and init["nodes"] == CLIENTS and init["classes_set"] == list(range(len(CLASSES)))
    assert init["temperature"] == 1.0 and init["shrinkage"] == 0.1  # no temperature fitted on the server's split


def test_a_random_head_gets_the_federations_class_counts_from_one_query(federations: dict[str, Any]) -> None:
    (counted,) = [e for e in federations["counts"]["events"] if e["event"] == "head-initialised"]
    assert counted["method"] == "random" and counted["nodes"] == CLIENTS and min(counted["class_counts"]) > 0
    told = federations["counts"]["instructions"]
    assert told.local_prior_correction is True and len(told.class_prior) == len(CLASSES)
    assert np.isclose(sum(told.class_prior), 1.0)  # the federation's shares, from the counts


def test_a_closed_form_head_trains_through_every_round(federations: dict[str, Any]) -> None:
    """The LDA head of well-separated classes starts with large weights (a tight covariance): its
    honest updates must pass the screen in every round (max-weight-norm counts from the starting head)."""
    tuned = federations["lda+ft"]
    assert [(r.clients_ok, r.clients_rejected) for r in tuned["rounds"]] == [(CLIENTS, 0)] * 2
    assert not [e for e in tuned["events"] if e["event"] == "client-rejected"]
    assert tuned["rounds"][-1].accuracy >= federations["probe"] - 0.02


def test_personal_heads_beat_the_global_head_on_local_data(federations: dict[str, Any]) -> None:
    for init in ("random", "ncm"):
        rounds = federations[init]["rounds"]
        personal = [r.client_personal_accuracy for r in rounds]
        shared = [r.client_accuracy for r in rounds]
        print(init, "global head", np.round(shared, 3), "personal heads", np.round(personal, 3))  # shown with -s
        assert all(p >= s for p, s in zip(personal, shared, strict=True))
        assert personal[-1] > 0.9  # two classes each: easy alone
    # where the global head is weak (random start, label skew), the personal heads gain most
    random_rounds = federations["random"]["rounds"]
    assert np.mean([r.client_personal_accuracy - r.client_accuracy for r in random_rounds]) > 0.05


def test_rounds_to_stay_needs_every_later_round_at_the_target() -> None:
    assert rounds_to_stay([0.5, 0.95, 0.97], initial=0.99, target=0.9) == 2
    assert rounds_to_stay([0.95, 0.97], initial=0.99, target=0.9) == 0
    assert rounds_to_stay([0.95, 0.5], initial=0.2, target=0.9) is None


def test_rounds_to_target_counts_from_the_initial_head() -> None:
    assert rounds_to_target([0.5, 0.9, 0.95], initial=0.2, target=0.9) == 2
    assert rounds_to_target([0.5, 0.6], initial=0.95, target=0.9) == 0
    assert rounds_to_target([0.5, 0.6], initial=0.2, target=0.9) is None
