"""Faults: poisoned and crashing clients, the server killed mid-run and restarted in the same
poisoned setup (through the real Flower runtime: the kill is of its processes), a run that cannot
go on. Small ELPV runs (a few hundred images, 3-8 clients); the runs whose checks are the
ServerApp's and ClientApp's alone run in process (tests/flower_runs.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common import protocol
from deploy.local_simulation import flwr_run
from server.checkpoint import Checkpoint, CheckpointError
from tests.conftest import with_server_engines
from tests.flower_runs import run_in_process

pytestmark = pytest.mark.flower

SMALL = {"subset": 240, "local-epochs": 2, "partitioner": "iid", "export-model": False, "views": "none"}


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, server_engines: Path) -> Path:
    """One cache for the module's runs: each image is embedded once, as on a board."""
    return with_server_engines(tmp_path_factory.mktemp("faults") / "cache", server_engines)


def _run(tmp: Path, name: str, clients: int, cache: Path, expect_ok: bool = True, **kwargs: Any) -> dict[str, Any]:
    config = {**SMALL, "cache-dir": str(cache), "runs-dir": str(tmp / "runs"), "run-name": name}
    config.update(kwargs.pop("config", {}))
    result = flwr_run(config, clients, tmp / f"flwr-home-{name}", timeout=600, **kwargs)
    run_dir = tmp / "runs" / name
    if expect_ok:
        assert result.returncode == 0, result.stdout[-4000:]
    summary = run_dir / "summary.json"
    return {
        "summary": json.loads(summary.read_text()) if summary.is_file() else None,
        "events": _events(run_dir) if (run_dir / "events.jsonl").is_file() else [],
        "output": result.stdout,
        "run_dir": run_dir,
    }


def _checkpointed_round(run_dir: Path) -> int:
    try:
        return Checkpoint.load(run_dir).round
    except CheckpointError:
        return 0


# Clients 1-3 of 8 misbehave in every round: NaN arrays, a 1000x update, a crash. Clients 4-6 make
# it a mixed fleet: one reports a CPU temperature, one an infinite count, one a metric no other
# node has (Flower's strategies refuse replies whose metric keys differ). Eight, so that five
# updates pass the first checks and the median-relative bound applies in every round (a fixed
# bound alone misses a scaled update once the learning rate has decayed).
CLIENTS = 8
POISONED = {
    "fault-clients": "1:nan-update,2:scaled-update,3:crash,4:hot-board,5:inf-counts,6:extra-metric",
    "min-clients": 2,
    "num-server-rounds": 3,
}


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory, cache: Path, server_engines: Path) -> dict[str, Any]:
    """One uninterrupted run with poisoned and crashing clients: checked on its own, and the
    reference an interrupted and resumed run of the same setup must end like. In process
    (tests/flower_runs.py): screening is the ServerApp's, and the same seeds give the runtime's
    result to the bit; the runs through the runtime below carry the same faults."""
    tmp = tmp_path_factory.mktemp("poisoned")
    return run_in_process(tmp, "reference", cache, server_engines, extra={**SMALL, **POISONED}, clients=CLIENTS)


def test_poisoned_and_crashing_clients_are_kept_out_and_the_run_goes_on(poisoned: dict[str, Any]) -> None:
    summary, events = poisoned["summary"], poisoned["events"]
    assert [(r["clients_ok"], r["clients_rejected"], r["clients_failed"]) for r in summary["rounds"]] == [(4, 3, 1)] * 3
    reasons = [e["reason"] for e in events if e["event"] == "client-rejected" and e["phase"] == "train"]
    assert sum("NaN" in r for r in reasons) == 3
    assert sum("max-update-ratio" in r or "max-update-norm" in r for r in reasons) == 3
    assert sum("'embeddings-computed'" in r for r in reasons) == 3
    # The mixed fleet's telemetry and extras are kept in the log; every evaluation was aggregated.
    replies = [e for e in events if e["event"] == "client-reply"]
    assert sum(protocol.CPU_TEMP_C in e["metrics"] for e in replies) == 6  # train and evaluate, 3 rounds
    assert sum("debug-queue-length" in e["metrics"] for e in replies) == 6
    assert all(r["client_accuracy"] is not None for r in summary["rounds"])
    crashes = [e["reason"] for e in events if e["event"] == "client-failed" and e["phase"] == "train"]
    assert len(crashes) == 3 and all("injected fault: crash" in r for r in crashes)
    assert summary["stopped"] is None and 0.0 < summary["final"]["accuracy"] <= 1.0


def test_a_killed_server_resumes_and_ends_like_an_uninterrupted_run(
    tmp_path: Path, cache: Path, server_engines: Path, poisoned: dict[str, Any]
) -> None:
    # The same run, killed (SIGKILL to the SuperLink's process group: server and clients) once a
    # round is checkpointed. One slow client keeps the later rounds long enough to land in.
    slow = {**POISONED, "fault-clients": "0:straggle," + POISONED["fault-clients"], "fault-delay": 2.0}
    run_dir = tmp_path / "runs" / "interrupted"
    killed = _run(
        tmp_path,
        "interrupted",
        CLIENTS,
        cache,
        expect_ok=False,
        config=slow,
        kill_when=lambda: _checkpointed_round(run_dir) >= 1,
    )
    assert killed["summary"] is None  # it really died mid-run
    reached = _checkpointed_round(run_dir)
    assert reached in (1, 2)  # it died between rounds, before the last

    # A fresh ServerApp (in process: resuming is the ServerApp's); the run continues from its
    # checkpoint with one setting.
    resumed = run_in_process(
        tmp_path,
        "resumed",
        cache,
        server_engines,
        extra={**SMALL, **POISONED, "resume-from": str(run_dir)},
        clients=CLIENTS,
    )
    assert not (tmp_path / "runs" / "resumed").exists()  # it continued in the original folder
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]  # no round lost or repeated
    events = _events(run_dir)
    restart = next(i for i, e in enumerate(events) if e["event"] == "run-resumed")
    assert events[restart]["from_round"] == reached
    trained_after = {e["round"] for e in events[restart:] if e["event"] == "client-reply" and e["phase"] == "train"}
    assert trained_after == set(range(reached + 1, 4))
    expected = poisoned["summary"]["final"]["accuracy"]
    assert abs(summary["final"]["accuracy"] - expected) <= 0.005, (summary["final"]["accuracy"], expected)
    assert resumed["output"]  # (kept for the failure message above)


def test_a_run_without_enough_usable_clients_stops_with_a_clear_message(
    tmp_path: Path, cache: Path, server_engines: Path
) -> None:
    # In process (tests/flower_runs.py): the stop is the ServerApp's; its log lines reach `flwr run
    # --stream` as every ServerApp line does (test_flower_runtime.py reads the round lines there).
    faults = {"fault-clients": "1:crash,2:crash", "min-clients": 2, "round-retries": 1}
    run = run_in_process(tmp_path, "stopped", cache, server_engines, extra={**SMALL, **faults}, expect_ok=False)
    summary = run["summary"]
    assert summary is not None and summary["completed_rounds"] == 0
    assert "Round 1 got fewer than min-clients=2 usable updates in 2 attempts" in summary["stopped"]
    assert "resume-from=" in summary["stopped"]
    assert [e["attempt"] for e in run["events"] if e["event"] == "round-retry"] == [2]
    assert str(run["stopped"]) == summary["stopped"]  # the ServerApp raised it: the Flower run fails
    assert f"ERROR {summary['stopped']}" in run["output"]  # and logged it for the operator's stream
