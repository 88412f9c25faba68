"""The deployment, for real: `flower-superlink` with TLS and SuperNode authentication and three
`flower-supernode` processes on loopback, each a "board" with its own key, ImageFolder and cache.

One scenario, in order, because starting the processes is the expensive part:
TLS is on; an unregistered board is refused; each board gets the backbone variant of its engine
(the default int8 ONNX model, or torch weights where its node config says so); a board is killed
in the middle of a round and the round completes with the others; started again at once, it
rejoins the same run under the same node id, in the next round that starts after it is back, and
does not download the backbone again; a run with secure sums and a 44.7 MB backbone goes through,
and stopping in the middle of that run stops every process.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from cryptography import x509

from client.telemetry import THERMAL_ROOT_ENV
from deploy.local_fleet import Board, LocalDeployment
from deploy.local_simulation import running
from server.credentials import make_credentials
from server.run_folder_view import RunView
from tests.conftest import with_server_engines, write_image_folder

pytestmark = pytest.mark.flower

CLASSES = {"ok": 8, "crack": 8}
VICTIM = "board-2"
HEARTBEAT = 10.0
ROUNDS = 5  # of the first run: the rounds after the kill give the restarted board time to be back


def _run_config(tmp: Path, name: str, rounds: int) -> dict[str, Any]:
    return {
        "num-server-rounds": rounds,
        "dataset": "folder",
        "class-names": "ok,crack",
        "server-test-dir": str(tmp / "server-test"),
        "min-clients": 2,
        "round-timeout": 120,
        "fraction-evaluate": 0.0,  # each message is a ClientApp process on a board: keep the test short
        "export-model": False,  # (the exported model is checked in test_flower_runtime.py: 10 s less here)
        "runs-dir": str(tmp / "runs"),
        "cache-dir": str(tmp / "server-cache"),
        "run-name": name,
    }


def _summary_and_events(tmp: Path, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run_dir = tmp / "runs" / name
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return json.loads((run_dir / "summary.json").read_text()), events


def _finish(process: subprocess.Popen[str], timeout: float = 400) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def _command_names(pid: int) -> set[str]:
    """The file names in a process's command line (a console script runs as: python <script> ...)."""
    try:
        return {
            Path(part.decode(errors="replace")).name for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        }
    except OSError:
        return set()


def _wait_for_line(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout}s")


def test_tls_authenticated_deployment_with_a_board_dying_mid_round(tmp_path: Path, server_engines: Path) -> None:
    # board-1 lacks "crack" and has a class folder the run does not know; it must say so, not crash.
    # The victim has many large images, so that it is still embedding when it is killed.
    folders = {
        "board-0": (CLASSES, 48),
        "board-1": ({"ok": 10, "smudge": 4}, 48),
        VICTIM: ({"ok": 60, "crack": 60}, 224),
    }
    for seed, (name, (counts, size)) in enumerate(folders.items()):
        write_image_folder(tmp_path / "data" / name, counts, seed=seed, size=size)
    write_image_folder(tmp_path / "server-test", CLASSES, seed=9)
    with_server_engines(tmp_path / "server-cache", server_engines)
    boards = [Board(f"board-{i}", {"data-dir": str(tmp_path / "data" / f"board-{i}")}) for i in range(3)]
    # The victim runs the torch engine (its node config overrides the run's "auto"): slow enough
    # to be caught embedding, and proof that one run serves boards of different engines.
    boards[2] = Board(VICTIM, {**boards[2].node_config, "engine": "torch"})
    # A mixed fleet: board-0 has a CPU thermal zone (a fake sysfs folder), the others none.
    sensor = tmp_path / "thermal"
    (sensor / "thermal_zone0").mkdir(parents=True)
    (sensor / "thermal_zone0" / "type").write_text("cpu-thermal\n")
    (sensor / "thermal_zone0" / "temp").write_text("48500\n")
    boards = [
        Board(b.name, b.node_config, {THERMAL_ROOT_ENV: str(sensor if b.name == "board-0" else tmp_path / "none")})
        for b in boards
    ]
    intruder_keys = make_credentials(tmp_path / "intruder", ["127.0.0.1"], ["intruder"])

    # A 10 s node heartbeat (Flower's default is 30 s; 10 s is the least the SuperLink accepts): the
    # SuperLink counts the killed board offline within 20 s of its last heartbeat, not 36-60 s.
    deployment = LocalDeployment(tmp_path / "deploy", boards, heartbeat_interval=HEARTBEAT)
    with deployment:
        # Authentication: a board whose key was never registered is refused and exits (checked below;
        # its process starts now, beside the TLS check).
        intruder = deployment.start_supernode("intruder", key=intruder_keys.board_private_key("intruder"))

        # TLS: the SuperLink presents a certificate for 127.0.0.1 signed by our CA, and nothing else.
        context = ssl.create_default_context(cafile=str(deployment.credentials.ca_certificate))
        with (
            socket.create_connection(("127.0.0.1", deployment.port)) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            certificate = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
        issuer = x509.load_pem_x509_certificate(deployment.credentials.ca_certificate.read_bytes()).subject
        assert certificate.issuer == issuer
        assert len(deployment.node_status()) == 3

        assert intruder.wait(timeout=90) != 0
        assert "Failed to activate SuperNode" in deployment.log_path("intruder").read_text()
        deployment.stop_supernode("intruder")
        assert sorted(deployment.node_status().values()) == ["online"] * 3

        # Run 1: the victim is killed (SIGKILL, with its ClientApp) while it embeds in round 1, and
        # started again at once, as a board that reboots: its key, node config and cache.
        first = deployment.submit(_run_config(tmp_path, "first", rounds=ROUNDS))
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.append(_finish(first)))
        reader.start()
        _wait_for_line(deployment.log_path(VICTIM), "embedding local images", timeout=300)
        deployment.stop_supernode(VICTIM, kill=True)
        killed_at = time.time()
        # Its many large images were there to be caught embedding; from here on 8 per class do (it
        # embeds them again in each run: it died before its cache held any).
        for image in (tmp_path / "data" / VICTIM).glob("*/*.png"):
            if int(image.stem) >= 8:
                image.unlink()
        # The SuperLink refuses a second SuperNode for a node it still counts online: start_supernode
        # waits until it counts the dead one offline (two heartbeats), as it notices the death itself.
        deployment.start_supernode(VICTIM)
        deployment.wait_until_online(3, timeout=90)
        back_at = time.time()
        reader.join(timeout=420)
        assert output, "the run did not finish"
        summary, events = _summary_and_events(tmp_path, "first")
        later = range(2, ROUNDS + 1)
        assert [r["round"] for r in summary["rounds"]] == [1, *later]
        assert summary["rounds"][0]["clients_ok"] == 2 and summary["rounds"][0]["clients_failed"] == 1
        assert summary["final"]["accuracy"] >= 0.75
        failed = [e for e in events if e["event"] == "client-failed"]
        assert [e["round"] for e in failed] == [1]
        # noticed by the heartbeat set above: within 2 intervals of the board's last heartbeat (a default
        # 30 s heartbeat would take at least 36 s)
        assert failed[0]["time"] - killed_at < 3.5 * HEARTBEAT, failed[0]["time"] - killed_at
        victim_node = failed[0]["node"]
        assert victim_node == deployment.node_id(VICTIM)  # one node: the restarted board keeps its id
        # It rejoins the same run: from the first round the server began after it was back, and in every
        # round after. Round 1 ends as the SuperLink counts it offline, the earliest it can be let in
        # again: it comes back during round 2 (with two boards, a few seconds) or at its end.
        began = {e["round"] + 1: e["time"] for e in events if e["event"] == "round-end"}
        after_restart = [r for r in later if began[r] > back_at]
        replies_of_victim = [e for e in events if e["event"] == "client-reply" and e["node"] == victim_node]
        rejoined = sorted({e["round"] for e in replies_of_victim})
        assert rejoined, f"back at {back_at - killed_at:.1f}s after the kill: {events}"
        assert rejoined == list(range(rejoined[0], ROUNDS + 1)), (rejoined, back_at - killed_at)  # to the run's end
        assert not after_restart or rejoined[0] <= after_restart[0], (rejoined, after_restart)
        trained = {e["round"] for e in replies_of_victim if e["phase"] == "train"}
        assert [r["clients_ok"] for r in summary["rounds"]] == [2] + [2 + (r in trained) for r in later]
        # all three in round 1, before the kill; restarted with its cache, the victim was asked what it
        # holds (a failed node may have lost its cache) and got no backbone again
        assert [r["backbones_sent"] for r in summary["rounds"]] == [3] + [0] * len(later)
        sent = {e["node"]: e["engine"] for e in events if e["event"] == "backbone-sent"}
        assert sent.pop(victim_node) == "torch" and list(sent.values()) == ["onnx-int8"] * 2
        # 13.6 MB of torch weights for the victim, 3.9 MB of int8 model for each of the others, and
        # with each variant its golden batch (4 images as float16: 1.2 MB)
        assert 23_000_000 < summary["rounds"][0]["bytes_down"] < 27_000_000
        # After round 1 only head-sized messages cross the wire (a head here is about 10 KB).
        assert all(r["bytes_down"] < 100_000 for r in summary["rounds"][1:])
        replies = [e for e in events if e["event"] == "client-reply"]
        short_of_a_class = [e for e in replies if e["metrics"]["classes-missing"] == 1]
        assert len(short_of_a_class) == ROUNDS  # board-1, in every round
        notes = short_of_a_class[0]["notes"]
        assert "no images for classes: ['crack']" in notes and "ignored 1 class folder(s)" in notes
        assert "smudge" not in notes  # the board's own folder: counted, not named
        # Device telemetry per node and round.
        assert {e["node"] for e in replies} and all(e["metrics"]["peak-rss-mb"] > 50 for e in replies)
        # named as registered, not by id alone; the victim after its restart runs the engine its node config says
        assert {e["board"]: e["engine"] for e in replies} == {
            "board-0": "onnx-int8",
            "board-1": "onnx-int8",
            VICTIM: "torch",
        }
        temperatures = {e["board"]: e["metrics"].get("cpu-temp-c") for e in replies}
        assert temperatures == {"board-0": 48.5, "board-1": None, VICTIM: None}  # and Flower aggregated them
        table = {row["board"]: row for row in RunView(tmp_path / "runs" / "first").state()["clients"]}
        assert (table["board-0"]["engine"], table["board-0"]["cpu_temp_c"]) == ("onnx-int8", 48.5)
        assert table["board-1"]["cpu_temp_c"] is None and table[VICTIM]["failures"] == 1
        assert all(e["metrics"]["train-seconds"] > 0 for e in replies)

        # The last run sums the updates with SecAgg+ (secure sums): the boards' protocol state lives
        # in each SuperNode's context between the ClientApp processes of its four stages. Its backbone
        # is new to every board and large (ResNet-18, 44.7 MB of float32 weights): it streams through
        # the same link. Stopping in the middle of a run (what Ctrl-C or SIGTERM on deploy-local does)
        # ends every process, the ServerApp included: Flower starts it in a session of its own. This
        # run is the one stopped, after its first round.
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pt")
        large = {
            "backbone": "resnet18",
            "backbone-weights": str(tmp_path / "resnet18.pt"),
            "image-size": 64,
            "engine": "torch",  # the float32 weights themselves, for every board
            "secure-sums": True,
            "min-clients": 3,
        }
        deployment.submit(_run_config(tmp_path, "large", rounds=100) | large)
        _wait_for_line(tmp_path / "runs" / "large" / "events.jsonl", '"round-end"', timeout=240)
        lines = (tmp_path / "runs" / "large" / "events.jsonl").read_text().splitlines(keepends=True)
        events = [json.loads(line) for line in lines if line.endswith("\n")]
        first_round = next(e for e in events if e["event"] == "round-end" and e["round"] == 1)
        assert first_round["backbones_sent"] == 3 and first_round["clients_ok"] == 3 and first_round["secure"] is True
        assert first_round["bytes_down"] > 3 * 44_000_000
        sums = [e for e in events if e["event"] == "secure-sum"]
        assert [(e["boards_in_sum"], e["dropped"]) for e in sums] == [(3, {})]
        assert not [e for e in events if e["event"] == "client-reply" and e["phase"] == "train"]  # no clear update
        running_before = deployment.process_ids()
        assert any("flwr-serverapp" in _command_names(pid) for pid in running_before)
        started = [deployment.supernode(b.name) for b in boards]
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 10
    assert not [pid for pid in running_before if running(pid)]
    assert all(process.poll() is not None for process in [*started, intruder])
    # A ClientApp child may still be exiting on a loaded machine: give the group a few seconds.
    deadline = time.monotonic() + 15
    while True:
        leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "deploy")], capture_output=True, text=True).stdout
        if not leftovers.strip() or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert leftovers.strip() == "", f"processes left running: {leftovers}"


def _exited(text: str, log: Path) -> subprocess.Popen[bytes]:
    """A SuperNode that wrote ``text`` to its log and exited."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(text)
    process = subprocess.Popen(["true"])
    process.wait()
    return process


def test_a_supernode_whose_port_was_taken_starts_again_and_another_exit_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = LocalDeployment(tmp_path, [Board("board-0")])
    taken = "ERROR: [Errno 98] error while attempting to bind on address ('127.0.0.1', 55591): address already in use"
    deployment._supernodes["board-0"] = _exited(taken, deployment.log_path("board-0"))
    restarts: list[str] = []
    with subprocess.Popen(["sleep", "30"]) as running_again:

        def start_again(name: str) -> subprocess.Popen[bytes]:
            restarts.append(name)
            deployment._supernodes[name] = running_again
            return running_again

        monkeypatch.setattr(deployment, "start_supernode", start_again)
        monkeypatch.setattr(deployment, "node_status", lambda timeout=60: {7: "online"} if restarts else {})
        deployment.wait_until_online(1, timeout=10)
        running_again.kill()
    assert restarts == ["board-0"]

    deployment._supernodes["board-0"] = _exited("Failed to activate SuperNode\n", deployment.log_path("board-0"))
    monkeypatch.setattr(deployment, "node_status", lambda timeout=60: {})
    with pytest.raises(RuntimeError, match="SuperNode board-0 exited with 0"):
        deployment.wait_until_online(1, timeout=10)
    assert restarts == ["board-0"]
