"""The dashboard, the static report and the TensorBoard scalars, all read from the run folder.

The browser test runs a tiny federation (the real ServerApp and ClientApps, in a thread of the test
process: tests/flower_runs.py; the dashboard only reads the folder it writes), serves its folder
with `edgesplit dashboard` (a real uvicorn process) and loads the page in headless Chromium
(Debian's `chromium`, driven by Playwright): the plots fill in while the run goes, and the client
table and confusion matrix match what the run wrote.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from deploy.local_simulation import free_port, stop_process, wait_for_port
from server.dashboard import DashboardError, check_host, make_app
from server.report import CURVES_PLOT, PLOTS, write_report
from server.run_folder import RunLog, write_json_atomic
from server.run_folder_view import RunView
from tests.conftest import REPO_ROOT
from tests.flower_runs import run_in_process

CHROMIUM = "/usr/bin/chromium"


def _round_end(server_round: int, accuracy: float, failed: int = 0) -> dict[str, Any]:
    return {
        "round": server_round,
        "accuracy": accuracy,
        "macro_f1": accuracy / 2,
        "loss": 1.0 / server_round,
        "bytes_down": 1000,
        "bytes_up": 500,
        "seconds": 0.5,
        "clients_ok": 2 - failed,
        "clients_failed": failed,
        "clients_rejected": 0,
        "confusion_matrix": [[server_round, 1], [0, 3]],
        "per_class_recall": [0.5, 1.0],
    }


def _reply(server_round: int, node: int, seconds: float) -> dict[str, Any]:
    metrics = {"num-examples": 10 + node, "train-seconds": seconds, "embed-seconds": 1.0, "peak-rss-mb": 300.0}
    return {"round": server_round, "phase": "train", "node": node, "bytes": 100, "bytes_down": 900, "metrics": metrics}


def _small_run(run_dir: Path) -> RunLog:
    """A run folder as the server writes it: two nodes, node 7 fails in round 2."""
    log = RunLog(run_dir)
    log.write_config({"run_config": {"num-server-rounds": 3}, "classes": ["ok", "crack"], "backbone": {"name": "b"}})
    log.event("run-start", backbone="b", fingerprint="f" * 64, engine="onnx-int8")
    log.event("client-reply", **_reply(1, 5, 0.2))
    log.event("client-reply", **_reply(1, 7, 0.9))
    log.event("round-end", **_round_end(1, 0.5))
    return log


def test_run_view_follows_a_stop_and_a_resume_without_repeating_rounds(tmp_path: Path) -> None:
    log = _small_run(tmp_path / "run")
    log.event("round-end", **_round_end(2, 0.55))  # logged, but the server died before checkpointing it
    log.event("run-end", final_accuracy=0.55, stopped="Round 3 got fewer than min-clients=2 usable updates")
    view = RunView(tmp_path / "run")
    assert view.state()["status"].startswith("stopped: Round 3")
    log.event("run-resumed", from_round=1, engine="onnx-int8")
    assert view.state()["status"] == "running"
    log.event("round-end", **_round_end(2, 0.6))
    log.event("round-end", **_round_end(3, 0.7))
    log.event("run-end", final_accuracy=0.7, stopped=None)
    state = view.state()
    assert [(r["round"], r["accuracy"]) for r in state["rounds"]] == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert state["status"] == "finished" and state["backbone"]["engine"] == "onnx-int8"


def test_run_view_reads_only_new_lines_and_puts_troubled_clients_first(tmp_path: Path) -> None:
    log = _small_run(tmp_path / "run")
    view = RunView(tmp_path / "run")
    first = view.state()
    assert first["status"] == "running" and [r["round"] for r in first["rounds"]] == [1]
    assert [c["node"] for c in first["clients"]] == ["5", "7"]  # strings: JavaScript would round 64-bit ids
    version = view.version

    log.event("client-reply", **_reply(2, 5, 0.3))
    log.event("client-failed", round=2, phase="train", node=7, reason="Node Unavailable")
    log.event("round-end", **_round_end(2, 0.75, failed=1))
    with (tmp_path / "run" / "events.jsonl").open("a") as handle:
        handle.write('{"event": "round-end", "round": 3')  # a line still being written
    second = view.state()
    assert view.version != version
    assert [r["round"] for r in second["rounds"]] == [1, 2]  # the half line is not read yet
    troubled, steady = second["clients"]
    assert (troubled["node"], troubled["failures"], troubled["rounds_joined"]) == ("7", 1, 1)
    assert "Node Unavailable" in troubled["last_problem"]
    assert (steady["samples"], steady["rounds_joined"], steady["bytes_up"], steady["bytes_down"]) == (15, 2, 200, 1800)
    assert second["confusion_matrix"] == [[2, 1], [0, 3]] and second["matrix_round"] == 2
    cells = {column["round"]: column["cells"] for column in second["timeline"]}
    assert cells[2]["7"]["status"] == "failed" and cells[2]["5"]["status"] == "ok"
    assert cells[1]["7"]["seconds"] == pytest.approx(1.9)  # train + embed: the straggler of round 1
    log.close()


def test_tensorboard_scalars_come_from_the_round_end_events(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = _small_run(tmp_path / "run")
    log.event("round-end", **_round_end(2, 0.75, failed=1))
    log.close()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    accuracy = [(s.step, s.value) for s in events.Scalars("round/accuracy")]
    assert accuracy == [(1, 0.5), (2, 0.75)]
    assert [s.value for s in events.Scalars("round/clients_failed")] == [0, 1]


def test_the_static_report_shows_every_round(tmp_path: Path) -> None:
    log = _small_run(tmp_path / "run")
    for server_round in (2, 3):
        log.event("round-end", **_round_end(server_round, 0.5 + server_round / 10))
    log.close()
    report = write_report(tmp_path / "run")
    page = report.read_text()
    for name in PLOTS.values():
        with Image.open(tmp_path / "run" / name) as image:
            assert image.format == "PNG" and image.width > 300
        assert f'src="{name}"' in page
    assert page.count("<tr><td>") == 3 + 2  # three rounds, two clients
    assert ">0.8000<" in page  # round 3's accuracy in the rounds table
    assert CURVES_PLOT not in page  # no operating point in this run's summary


def test_the_static_report_plots_each_operating_point(tmp_path: Path) -> None:
    log = _small_run(tmp_path / "run")
    log.close()
    curve = {"precision": [1.0, 0.8, 0.5], "recall": [0.2, 0.6, 1.0]}
    point = {"name": "defective", "target_precision": 0.8, "threshold": 0.4, "precision": 0.8, "recall": 0.6}
    write_json_atomic(tmp_path / "run" / "summary.json", {"operating_points": [{**point, "curve": curve}]})
    page = write_report(tmp_path / "run").read_text()
    with Image.open(tmp_path / "run" / CURVES_PLOT) as image:
        assert image.format == "PNG"
    assert f'src="{CURVES_PLOT}"' in page and "defective: 0.600 (precision 0.800, threshold 0.400)" in page


def test_the_app_only_reads(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    _small_run(tmp_path / "run").close()
    client = TestClient(make_app(tmp_path / "run"), base_url="http://127.0.0.1:8050")
    assert client.get("/api/state").json()["rounds"][0]["accuracy"] == 0.5
    for method in ("post", "put", "delete"):
        assert getattr(client, method)("/api/state").status_code == 405
        assert getattr(client, method)("/run/config.json").status_code == 405
    assert (tmp_path / "run" / "config.json").is_file()


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:8050", 200),
        ("localhost:8050", 200),
        ("[::1]:8050", 200),
        ("LOCALHOST", 200),
        ("attacker.example:8050", 421),  # DNS rebinding: the attacker's name, resolved to 127.0.0.1
        ("attacker.example", 421),
        ("127.0.0.1:9999", 421),  # not the port it was bound to
        ("127.0.0.1.attacker.example", 421),
        ("", 421),
    ],
)
def test_the_dashboard_answers_only_to_the_names_it_was_bound_for(tmp_path: Path, host: str, status: int) -> None:
    from starlette.testclient import TestClient

    _small_run(tmp_path / "run").close()
    client = TestClient(make_app(tmp_path / "run"))
    for path in ("/api/state", "/run/config.json", "/"):
        response = client.get(path, headers={"host": host})
        assert response.status_code == status, path
        assert status == 200 or b"num-server-rounds" not in response.content
    remote = TestClient(make_app(tmp_path / "run", "0.0.0.0", 80, allowed_hosts=("edge-server.lan",)))
    assert remote.get("/api/state", headers={"host": "edge-server.lan"}).status_code == 200
    assert remote.get("/api/state", headers={"host": "attacker.example"}).status_code == 421


def test_a_node_claiming_1e308_seconds_does_not_break_the_state(tmp_path: Path) -> None:
    """1e308 + 1e308 is inf, which JSON cannot carry: the state endpoint answered 500."""
    from starlette.testclient import TestClient

    log = _small_run(tmp_path / "run")
    huge = _reply(4, 9, 1e308)
    huge["metrics"] |= {"embed-seconds": 1e308, "peak-rss-mb": 1e308, "cpu-temp-c": 1e308, "num-examples": 1e300}
    log.event("client-reply", **huge)
    log.close()
    response = TestClient(make_app(tmp_path / "run"), base_url="http://127.0.0.1:8050").get("/api/state")
    assert response.status_code == 200
    row = next(c for c in response.json()["clients"] if c["node"] == "9")
    assert row["train_seconds"] == 0.0 and row["embed_seconds"] == 0.0 and row["cpu_temp_c"] is None
    assert row["peak_rss_mb"] == 0.0 and row["samples"] == 0
    cell = next(t for t in response.json()["timeline"] if t["round"] == 4)["cells"]["9"]
    assert cell["seconds"] == 0.0


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::"])
def test_a_non_loopback_address_is_refused_unless_allowed(host: str) -> None:
    with pytest.raises(DashboardError, match="--allow-remote"):
        check_host(host, allow_remote=False)
    check_host(host, allow_remote=True)
    check_host("127.0.0.1", allow_remote=False)
    check_host("localhost", allow_remote=False)


def test_the_command_exits_with_a_reason_for_a_public_host(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "common.cli", "dashboard", str(tmp_path), "--host", "0.0.0.0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "not a loopback address" in result.stderr


# --- the real thing: a run, the dashboard process, a browser ---------------------------------------


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    """A raw GET: the path goes out exactly as written (no client-side ``..`` folding)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.read(), dict(response.getheaders())


def test_live_dashboard_in_a_real_browser(tmp_path: Path, server_engines: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "Debian's chromium is missing: `make setup` installs it"
    run_dir = tmp_path / "runs" / "live"
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    config = {"subset": 240, "num-server-rounds": 3, "local-epochs": 1, "views": "none"}
    finished: list[dict[str, Any]] = []
    failed: list[BaseException] = []

    def federation() -> None:
        try:
            finished.append(run_in_process(tmp_path, "live", tmp_path / "cache", server_engines, extra=config))
        except BaseException as error:  # shown by the assertion below
            failed.append(error)

    run = threading.Thread(target=federation)

    port = free_port()
    log_path = tmp_path / "dashboard.log"
    with log_path.open("wb") as log:
        # started before the run folder exists: it waits for it
        dashboard = subprocess.Popen(
            [sys.executable, "-m", "common.cli", "dashboard", str(run_dir), "--port", str(port)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_for_port(port, dashboard, log_path, timeout=60)  # type: ignore[arg-type]
        run.start()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"http://127.0.0.1:{port}/")
            # live: the plots reach two rounds without a reload, while the run goes on
            page.wait_for_function(
                "Number(document.getElementById('chart-accuracy').dataset.rounds) >= 2", timeout=300_000
            )
            seen_while_running = page.inner_text("#status")
            run.join(timeout=600)
            assert finished, f"the run failed: {failed!r}"
            page.wait_for_function("document.getElementById('status').textContent === 'finished'", timeout=30_000)
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            summary = json.loads((run_dir / "summary.json").read_text())
            events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]

            assert page.get_attribute("#chart-accuracy", "data-rounds") == "3"
            cells = page.eval_on_selector_all(
                "#confusion td[data-row]", "cells => cells.map(c => [+c.dataset.row, +c.dataset.col, +c.textContent])"
            )
            shown = [[0] * len(summary["classes"]) for _ in summary["classes"]]
            for row, col, count in cells:
                shown[row][col] = count
            assert shown == summary["final"]["confusion_matrix"]

            rows = page.eval_on_selector_all(
                "#clients tr[data-node]",
                "rows => rows.map(r => Object.fromEntries([...r.cells].map(c => [c.dataset.key, c.textContent])))",
            )
            replies = [e for e in events if e["event"] == "client-reply" and e["phase"] == "train"]
            assert sorted(row["node"] for row in rows) == sorted({str(e["node"]) for e in replies})
            for row in rows:
                mine = [e for e in replies if str(e["node"]) == row["node"]]
                assert int(row["samples"]) == mine[-1]["metrics"]["num-examples"]
                assert int(row["rounds_joined"]) == len({e["round"] for e in mine}) == 3
                assert row["engine"] == "onnx-int8" and row["failures"] == "0"
            assert sum(1 for _ in page.query_selector_all("#timeline rect[data-status='ok']")) == 3 * 3
            assert summary["model_dir"] in page.inner_text("#meta")
            assert requested and all(url.startswith(f"http://127.0.0.1:{port}/") for url in requested)  # nothing else
            browser.close()
        assert seen_while_running in {"running", "finished"}
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000

        # read-only, and nothing outside the run folder
        status, body, _ = _get(port, "/run/summary.json")
        assert status == 200 and json.loads(body) == summary
        etag = _get(port, "/api/state")[2]["etag"]
        assert _get(port, "/api/state", {"If-None-Match": etag})[0] == 304  # an idle poll costs nothing
        escapes = ("/run/../secret.txt", "/run/%2e%2e/secret.txt", "/run/..%2fsecret.txt", "/static/../../secret.txt")
        for path in escapes:
            status, body, _ = _get(port, path)
            assert status in (403, 404) and b"TOP SECRET" not in body, path
        os.symlink(tmp_path / "secret.txt", run_dir / "link.txt")
        assert _get(port, "/run/link.txt")[0] == 403  # a link out of the folder is refused too
        assert (run_dir / "report.html").is_file() and all((run_dir / name).is_file() for name in PLOTS.values())
    finally:
        stop_process(dashboard)  # type: ignore[arg-type]


def test_events_and_the_client_table_name_each_board(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "run")
    log.board_names.update({5: "greenhouse-pi"})  # what the strategy reads from the SuperLink
    log.event("run-start", engine="onnx-int8")
    log.event("client-reply", **_reply(1, 5, 0.2))
    log.event("client-failed", round=1, phase="train", node=7, reason="Node Unavailable")
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e.get("board") for e in events] == [None, "greenhouse-pi", None]  # node 7 has no name
    boards = {c["node"]: c["board"] for c in RunView(tmp_path / "run").state()["clients"]}
    assert boards == {"5": "greenhouse-pi", "7": ""}


def test_the_client_table_shows_each_boards_machine_and_golden_cosine(tmp_path: Path) -> None:
    """A mixed fleet: what each board reports of its CPU architecture and its engine's golden check."""
    log = RunLog(tmp_path / "run")
    log.event("client-reply", **_reply(1, 5, 0.2), engine="onnx-int8", machine="aarch64", golden_cosine=0.9931)
    log.event("client-reply", **_reply(1, 7, 0.2), engine="onnx-int8", machine="x86_64", golden_cosine=0.9942)
    log.event("client-reply", **_reply(2, 5, 0.2), engine="onnx-int8", golden_cosine=0.9931)  # an older node's key
    rows = {
        c["node"]: (c["machine"], c["engine"], c["golden_cosine"]) for c in RunView(tmp_path / "run").state()["clients"]
    }
    assert rows == {"5": ("aarch64", "onnx-int8", 0.9931), "7": ("x86_64", "onnx-int8", 0.9942)}
    log.close()
