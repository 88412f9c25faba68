"""Run the app through the real Flower runtime on this machine, leaving nothing behind.

``flwr run`` alone starts a detached local SuperLink on fixed ports that outlives the command.
For scripts and tests we start our own ``flower-superlink --simulation`` on free loopback ports,
point a private FLWR_HOME at it, submit with ``flwr run``, and stop it afterwards.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONNECTION = "edgesplit-local"


@functools.cache
def app_source(root: Path = PROJECT_ROOT) -> Path:
    """A copy of the app's own files (``root`` less what .gitignore leaves out, and .git), made
    once per process, for ``flwr run`` to build its FAB from. Flower collects every file under
    the app folder before filtering: with a virtual environment inside the project (``make
    setup``) that is some 60,000 files and 6-9 s of every ``flwr run``. The FAB is the same: what
    is left out here its own .gitignore filter leaves out too."""
    from common.flower_glue import fab_ignore_rules

    ignored = fab_ignore_rules(root / ".gitignore")
    staged = Path(tempfile.mkdtemp(prefix="edgesplit-app-"))
    atexit.register(shutil.rmtree, staged, ignore_errors=True)
    for directory, subdirectories, files in os.walk(root):
        relative = Path(directory).relative_to(root)
        subdirectories[:] = [d for d in subdirectories if d != ".git" and not ignored(f"{(relative / d).as_posix()}/")]
        for name in files:
            source = Path(directory) / name
            if source.is_symlink() or ignored((relative / name).as_posix()):
                continue
            (staged / relative).mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, staged / relative / name)
    return staged


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    # The SuperLink would otherwise `uv sync` the app's dependencies from the internet per run;
    # they are already installed in this environment.
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Flower's Ray backend calls ray.init() without an address: Ray then joins the cluster RAY_ADDRESS
    # names (a user's `ray start` cluster: README, "Past one machine"), else the last one started on
    # this machine, if any is running. "local": a Ray instance of this run's own, never a cluster
    # someone else left running here.
    env.setdefault("RAY_ADDRESS", "local")
    env.update(extra or {})
    return env


@contextlib.contextmanager
def simulation_superlink(
    flwr_home: Path, env: Mapping[str, str] | None = None
) -> Iterator[tuple[dict[str, str], subprocess.Popen[bytes]]]:
    """A SuperLink in simulation mode on free loopback ports; yields the env for ``flwr run``
    and the SuperLink's process (its group holds the whole simulated federation).

    Loopback only, so it runs without TLS: nothing leaves this machine.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    port, control_port = free_port(), free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    run_env = flower_env(flwr_home, env)
    log_path = flwr_home / "superlink.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [
                "flower-superlink",
                "--insecure",
                "--simulation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--control-api-address",
                f"127.0.0.1:{control_port}",
            ],
            cwd=PROJECT_ROOT,
            env=run_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group to stop, with its children
        )
    try:
        wait_for_port(port, process, log_path)
        yield run_env, process
    finally:
        stop_process(process)


def wait_for_port(port: int, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {process.returncode}; see {log_path}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"flower-superlink did not listen on port {port} within {timeout:.0f}s; see {log_path}")


def process_tree(pid: int) -> list[int]:
    """Every descendant of ``pid`` now, read from /proc (Linux; elsewhere none). Flower's SuperLink
    starts its SuperExec in a session of its own, and that starts the ServerApp: a signal to the
    SuperLink's process group reaches neither, and they outlive it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the field after the name
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited process its parent has not reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def stop_processes(processes: list[subprocess.Popen[bytes]], kill: bool = False, grace: float = 8.0) -> None:
    """Stop processes started with ``start_new_session``, together: every child in their groups and
    every descendant elsewhere (a detached SuperExec and its ServerApp) gets SIGTERM (SIGKILL with
    ``kill``), and whatever still runs after ``grace`` seconds gets SIGKILL."""
    # The trees before any signal: an orphan is re-parented and lost to the walk.
    tree = [pid for process in processes for pid in process_tree(process.pid)]
    signum = signal.SIGKILL if kill else signal.SIGTERM
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
    _signal(tree, signum)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    while any(map(running, tree)) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal([pid for pid in tree if running(pid)], signal.SIGKILL)


def stop_process(process: subprocess.Popen[bytes], kill: bool = False, grace: float = 8.0) -> None:
    """``stop_processes`` of one process."""
    stop_processes([process], kill, grace)


def run_config_arg(overrides: Mapping[str, Any]) -> str:
    """Flower's --run-config syntax: strings quoted, numbers bare."""
    parts = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        elif isinstance(value, str):
            parts.append(f"{key}={str(value)!r}".replace("'", '"'))  # str(): a kind (StrEnum) as its plain value
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def flwr_run(
    run_config: Mapping[str, Any],
    num_supernodes: int,
    flwr_home: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 1800,
    stream_to: Any = None,
    kill_when: Callable[[], bool] | None = None,
    federation: Mapping[str, Any] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``flwr run . --stream`` against a private simulation SuperLink; returns the output.

    ``kill_when``: polled every 0.1 s; once true, the SuperLink's whole process group (server
    and simulated clients) is killed with SIGKILL, as a power cut would. ``federation``: more
    simulation settings (e.g. ``client_resources_num_cpus``), beside ``num-supernodes``.
    """
    with simulation_superlink(flwr_home, env) as (run_env, superlink):
        settings = " ".join(
            f"{key}={value}" for key, value in {"num-supernodes": num_supernodes, **(federation or {})}.items()
        )
        command = ["flwr", "run", str(app_source()), CONNECTION, "--stream", "--federation-config", settings]
        if run_config:
            command += ["--run-config", run_config_arg(run_config)]
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=run_env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        if kill_when is not None:
            threading.Thread(target=_kill_when, args=(kill_when, superlink, process), daemon=True).start()
        lines = []
        assert process.stdout is not None
        started = time.monotonic()
        for line in process.stdout:
            lines.append(line)
            if stream_to is not None:
                stream_to.write(line)
                stream_to.flush()
            if time.monotonic() - started > timeout:
                process.kill()
                break
        returncode = process.wait()
        return subprocess.CompletedProcess(command, returncode, "".join(lines), "")


def flwr_run_results(
    tmp: Path,
    name: str,
    run_config: Mapping[str, Any],
    num_supernodes: int,
    timeout: float = 1800,
    env: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One benchmark run through ``flwr_run`` into ``tmp/runs/<name>``: its summary.json and its
    events.jsonl, or RuntimeError with the output's tail if it did not finish. ``env``: more
    environment for the simulated boards (e.g. their ``EDGESPLIT_MIN_GRAM_EXAMPLES``)."""
    run_dir = tmp / "runs" / name
    config = {"runs-dir": str(run_dir.parent), "run-name": name, **run_config}
    result = flwr_run(config, num_supernodes, tmp / f"{name}-flwr-home", timeout=timeout, env=env)
    if result.returncode != 0 or not (run_dir / "summary.json").is_file():
        raise RuntimeError(result.stdout[-3000:])
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return json.loads((run_dir / "summary.json").read_text()), events


def _kill_when(condition: Callable[[], bool], superlink: subprocess.Popen[bytes], run: subprocess.Popen[str]) -> None:
    while run.poll() is None:
        if condition():
            # The simulation runtime runs in its own session, outside the SuperLink's process
            # group: kill every descendant, found before any of them dies.
            for pid in [*descendants(superlink.pid), superlink.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            superlink.wait()
            run.kill()
            return
        time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux: from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        below = children.get(queue.pop(), [])
        found += below
        queue += below
    return found


def run_child(
    module: str, setup: Mapping[str, Any], timeout: float = 1800, launcher: Sequence[str] = ()
) -> dict[str, Any]:
    """Run ``python -m <module> --child <setup JSON>`` in a fresh process (a benchmark's clean
    measurement) and return the JSON object it prints last. ``launcher`` runs the interpreter
    through another program (e.g. an emulator of another CPU)."""
    import json

    result = subprocess.run(
        [*launcher, sys.executable, "-m", module, "--child", json.dumps(setup)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{module} child process failed:\n{result.stderr[-3000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))
