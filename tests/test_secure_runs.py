"""Runs with secure sums, through the real ServerApp and ClientApp in this process
(tests/flower_runs.py InProcessFlower: every board its own Flower context, its SecAgg+ state kept
there between messages, its mods and privacy guard in the path): the secured LDA head is the clear
one, boards dropping and a poisoned part are survived or caught, and no board's part is readable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.config import MIN_GRAM_ENV
from common.kinds import EventKind
from tests.flower_runs import run_in_process

CLIENTS = 4
SECURE = {"secure-sums": True, "min-clients": 3, "min-sum-examples": 50}
# Two classes and an IID split: every board holds more images of each than the clear reply's floor,
# so the clear and the secure sums add up the same images.
LDA = {
    "head-init": "lda",
    "class-balance": "logit-adjusted",
    "logit-adjust-tau": 0.5,
    "export-model": False,
    "elpv-task": "binary",
    "partitioner": "iid",
}


def head_of(run: dict[str, Any]) -> dict[str, np.ndarray]:
    with np.load(run["run_dir"] / "checkpoint" / "head.npz") as saved:
        return dict(saved)


def events(run: dict[str, Any], kind: EventKind) -> list[dict[str, Any]]:
    return [e for e in run["events"] if e["event"] == kind.value]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, server_engines: Path) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("secure")
    cache = tmp / "cache"
    found: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MIN_GRAM_ENV, "2")  # the clear run's boards opt in below the Gram floor
        found["clear"] = run_in_process(tmp, "clear", cache, server_engines, {**LDA, "num-server-rounds": 1}, CLIENTS)
    found["secure"] = run_in_process(
        tmp, "secure", cache, server_engines, {**LDA, **SECURE, "num-server-rounds": 1}, CLIENTS
    )
    found["dropped"] = run_in_process(
        tmp,
        "dropped",
        cache,
        server_engines,
        {**LDA, **SECURE, "num-server-rounds": 1, "fault-clients": "1:drop-at-unmask"},
        CLIENTS,
    )
    found["poisoned"] = run_in_process(
        tmp,
        "poisoned",
        cache,
        server_engines,
        {**LDA, **SECURE, "num-server-rounds": 1, "round-retries": 0, "fault-clients": "2:scaled-update"},
        CLIENTS,
        expect_ok=False,
    )
    return found


def test_the_secured_lda_head_is_the_clear_one(runs: dict[str, Any]) -> None:
    clear, secure = runs["clear"]["summary"], runs["secure"]["summary"]
    assert clear["head_init"]["secure"] is False and secure["head_init"]["secure"] is True
    assert secure["head_init"]["boards_in_sum"] == CLIENTS
    assert secure["head_init"]["class_counts"] == clear["head_init"]["class_counts"]
    first = [events(runs[name], EventKind.INITIAL_EVALUATION)[0] for name in ("clear", "secure")]
    assert abs(first[0]["accuracy"] - first[1]["accuracy"]) <= 1e-9  # the same predictions
    assert abs(first[0]["macro_f1"] - first[1]["macro_f1"]) <= 1e-9


def test_a_secure_round_trains_and_records_its_stages(runs: dict[str, Any]) -> None:
    secure = runs["secure"]
    sums = events(secure, EventKind.SECURE_SUM)
    assert [e["phase"] for e in sums] == ["ridge-sums", "train"]
    for event in sums:
        assert event["boards_in_sum"] == CLIENTS and [s["stage"] for s in event["stages"]] == [
            "setup",
            "share_keys",
            "collect_masked_vectors",
            "unmask",
        ]
        assert all(s["answered"] == CLIENTS for s in event["stages"])
    rounds = secure["summary"]["rounds"]
    assert rounds[0]["clients_ok"] == CLIENTS and rounds[0]["secure"] is True
    assert rounds[0]["accuracy"] > 0.5


def test_a_board_dropping_mid_sum_is_survived_and_counted(runs: dict[str, Any]) -> None:
    """Board 1 sends its masked part, then drops before it returns its shares: its part stays in the
    sum (its mask seed rebuilt from its neighbours' shares), in every sum of the run, and the round
    trains as the run without the drop does. (Drops at the other stages: tests/test_secure_sum.py.)"""
    dropped = runs["dropped"]
    sums = events(dropped, EventKind.SECURE_SUM)
    assert [(e["boards_in_sum"], e["dropped"]) for e in sums] == [(CLIENTS, {"unmask": 1})] * 2
    failed = events(dropped, EventKind.CLIENT_FAILED)
    assert len(failed) == 2 and all("secure sum, unmask" in e["reason"] for e in failed)
    assert not events(dropped, EventKind.ROUND_SKIPPED)
    same = [events(runs[name], EventKind.ROUND_END)[0]["accuracy"] for name in ("secure", "dropped")]
    assert same[0] == same[1]  # the same sum, so the same head


def test_a_poisoned_part_cannot_be_screened_but_its_sum_is_refused(runs: dict[str, Any]) -> None:
    """Masking hides which board sent what: the server refuses the sum as a whole (the trade-off
    against screened clear replies, README)."""
    poisoned = runs["poisoned"]
    assert poisoned["stopped"] is not None
    skipped = events(poisoned, EventKind.ROUND_SKIPPED)
    assert skipped and skipped[0]["usable"] == CLIENTS  # every part arrived; their sum is no average
    assert any(words in skipped[0]["reason"] for words in ("not usable", "max-weight-norm", "is no accuracy"))


def test_no_reply_of_a_secure_run_carries_a_clear_part(runs: dict[str, Any]) -> None:
    """What left the boards (the audit log of every reply): in the secure run, no array record and
    no number of images, loss or count; only masked parts and the status."""
    audit = runs["secure"]["audit"]
    secured = [r for r in audit if "secaggplus_configs" in r["configs"]]
    assert len(secured) == 2 * 4 * CLIENTS  # two sums, four stages, every board
    assert all(not r["arrays"] for r in secured)
    collect = [r for r in secured if "masked_params" in r["configs"]["secaggplus_configs"]]
    assert len(collect) == 2 * CLIENTS
    assert all(set(r["metrics"].get("metrics", {})) <= {"backbone-received"} for r in collect)
    json.dumps(audit)


def test_the_dashboard_and_report_say_whether_sums_were_secure(runs: dict[str, Any]) -> None:
    from server.report import _facts
    from server.run_folder_view import RunView

    secure = RunView(runs["dropped"]["run_dir"]).state()
    assert secure["secure_sums"]["used"] is True
    assert [(s["phase"], s["boards"], s["dropped"]) for s in secure["secure_sums"]["sums"]] == [
        ("ridge-sums", CLIENTS, 1),
        ("train", CLIENTS, 1),
    ]
    assert "ridge-sums (round 0): 4 boards, 1 dropped" in dict(_facts(secure))["secure sums"]
    clear = RunView(runs["clear"]["run_dir"]).state()
    assert clear["secure_sums"]["used"] is False and "in the clear" in dict(_facts(clear))["secure sums"]
