"""A whole deployment on one machine, as separate processes: what the boards would run, minus the boards.

``flower-superlink`` with TLS and SuperNode authentication, and one ``flower-supernode`` per
board, each with its own key pair, data folder, cache directory and Flower home, exactly as on
real devices (README, "Deploy on real devices"). Used by ``edgesplit deploy-local`` for
development and by the deployment test.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from common.kinds import DatasetKind
from deploy.arm64_userland import DEFAULT_CPU, Userland
from deploy.local_simulation import (
    PROJECT_ROOT,
    app_source,
    flower_env,
    free_port,
    process_tree,
    run_config_arg,
    stop_process,
    stop_processes,
    wait_for_port,
)
from server.credentials import Credentials, make_credentials

log = logging.getLogger(__name__)
HEARTBEAT_LAUNCHER = Path(__file__).with_name("supernode_heartbeat.py")
EMULATED_LAUNCHER = Path(__file__).with_name("emulated_supernode.py")
# Seconds an emulated board's ClientApp process has to connect (Flower: 30); importing Flower under
# qemu-aarch64 took longer than 30 s on this busy 2-core machine.
EMULATED_APP_START_SECONDS = 300

PORT_TAKEN = "address already in use"  # a SuperNode's log when its API port went to another process
HEARTBEAT_DEFAULT = 30.0  # seconds: Flower's node heartbeat, where heartbeat_interval is None

CONNECTION = "edgesplit-deployment"
INSECURE_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! --insecure: TLS is OFF. Head weights, metrics and the backbone travel in clear text and\n"
    "!! anyone on the network can impersonate the server. Use it only on a trusted loopback/lab link.\n" + "!" * 78
)


@dataclass(frozen=True)
class Board:
    """One simulated board: its name (key file name), Flower node config and extra environment."""

    name: str
    node_config: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    # How this board runs Python, where it is not this interpreter: an emulated arm64 board's
    # launcher (deploy/arm64_userland.py), whose env also puts its Flower commands first on PATH.
    python: tuple[str, ...] = ()


def arm64_board(name: str, node_config: Mapping[str, Any], userland: Userland, cpu: str = DEFAULT_CPU) -> Board:
    """A board whose SuperNode, SuperExec and ClientApps all run on the emulated aarch64 Python of
    ``userland`` (qemu-aarch64 -cpu ``cpu``), with ``edgesplit[edge]`` as pip installed it there."""
    return Board(name, node_config, userland.board_env(cpu), (str(userland.bin_dir / "python3"),))


@dataclass
class LocalDeployment:
    """SuperLink + SuperNodes as processes on this machine; use as a context manager."""

    workdir: Path
    boards: list[Board]
    insecure: bool = False
    extra_env: Mapping[str, str] | None = None
    port: int = 0
    # the Flower app `flwr run` submits (benchmarks compare another revision's); default: this one's
    app_dir: Path | None = None
    # Seconds between a SuperNode's heartbeats as it declares them to the SuperLink, which counts a
    # silent node offline after twice that. None: Flower's own 30 s, as on real boards (a board
    # that dies unannounced is noticed within a minute). Tests pass 10, the least the SuperLink
    # accepts, to notice a killed board within 20 s (common.flower_glue.run_supernode_with_heartbeat).
    heartbeat_interval: float | None = None
    _superlink: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _supernodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False, repr=False)
    _node_ids: dict[str, int] = field(default_factory=dict, init=False, repr=False)  # board -> its node id
    _started: set[str] = field(default_factory=set, init=False, repr=False)  # boards started at least once

    # --- paths -------------------------------------------------------------------------------

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.workdir / "credentials")

    @property
    def flwr_home(self) -> Path:
        """The operator's Flower home: holds the connection `flwr run` and `flwr supernode` use."""
        return self.workdir / "operator"

    def board_dir(self, name: str) -> Path:
        return self.workdir / "boards" / name

    def log_path(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home, self.extra_env)

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, wait_online: float | None = None) -> None:
        """Credentials, SuperLink, registration of every board's key, then the SuperNodes."""
        if self.insecure:
            log.warning(INSECURE_WARNING)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        make_credentials(self.credentials.folder, ["127.0.0.1", "localhost"], [b.name for b in self.boards])
        self.port = self.port or free_port()
        self._write_connection()
        # A fresh SuperLink state each start (in memory): every board key is registered anew
        # below. The boards' caches (backbone, embeddings) live in their own folders and persist.
        self._superlink = self._spawn("superlink", self._superlink_command(), self.env, cwd=PROJECT_ROOT)
        wait_for_port(self.port, self._superlink, self.log_path("superlink"))
        with ThreadPoolExecutor(max_workers=8) as pool:  # one `flwr` process each: a second or two apiece
            list(pool.map(self.register, [board.name for board in self.boards]))
        for board in self.boards:
            self.start_supernode(board.name)
        # An emulated board's SuperNode imports Flower under qemu: a minute or more on a busy machine.
        emulated = any(board.python for board in self.boards)
        self.wait_until_online(len(self.boards), wait_online or (600 if emulated else 120))

    def stop(self) -> None:
        """Stop every process this deployment started, all at once: SuperNodes, the SuperLink, and
        their descendants (SuperExecs, the ServerApp, ClientApps)."""
        processes = [*self._supernodes.values(), *([self._superlink] if self._superlink else [])]
        self._supernodes.clear()
        self._superlink = None
        stop_processes(processes)

    def process_ids(self) -> list[int]:
        """Every process this deployment runs now: the SuperLink, the SuperNodes and all their
        descendants (SuperExecs, the ServerApp, ClientApps)."""
        started = [p.pid for p in [self._superlink, *self._supernodes.values()] if p is not None and p.poll() is None]
        return started + [child for pid in started for child in process_tree(pid)]

    # --- the SuperLink ------------------------------------------------------------------------------

    def _superlink_command(self) -> list[str]:
        command = [
            "flower-superlink",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            # No --database: Flower's in-memory state. With its SQLite file, concurrent pushes from
            # ten boards failed with "database is locked" and their replies were lost (issue 16).
            "--enable-supernode-auth",
            # Apps' dependencies are installed already; boards have no internet in the field either.
            "--disable-runtime-dependency-installation",
        ]
        if self.insecure:
            return [*command, "--insecure"]
        credentials = self.credentials
        return [
            *command,
            "--ssl-certfile",
            str(credentials.server_certificate),
            "--ssl-keyfile",
            str(credentials.server_key),
            "--ssl-ca-certfile",
            str(credentials.ca_certificate),
        ]

    def _write_connection(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        security = "insecure = true" if self.insecure else f'root-certificates = "{self.credentials.ca_certificate}"'
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n{security}\n'
        )

    def _flwr(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run(
            ["flwr", *args], env=self.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result.stdout

    def register(self, name: str) -> int:
        """Register a board's public key, under its name, with the SuperLink (what the operator
        does once per board); the run's events, dashboard and report then name the board."""
        key = str(self.credentials.board_public_key(name))
        output = self._flwr("supernode", "register", key, CONNECTION, "--name", name, "--format", "json")
        self._node_ids[name] = int(_last_json(output)["node-id"])
        return self._node_ids[name]

    def node_id(self, name: str) -> int:
        """The node id the SuperLink gave the board's key when it was registered (a restarted board keeps it)."""
        return self._node_ids[name]

    def node_status(self, timeout: float = 60) -> dict[int, str]:
        """Node id -> status ("registered", "online", "offline", ...) as the SuperLink sees it."""
        listed = self._flwr("supernode", "list", CONNECTION, "--format", "json", timeout=timeout)
        nodes = _last_json(listed).get("nodes", [])
        return {int(node["node-id"]): str(node["status"]) for node in nodes}

    def wait_until_online(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        port_retries: dict[str, int] = {}
        while time.monotonic() < deadline:
            try:
                # Thirty SuperNodes starting on two busy cores can keep `flwr supernode list` past
                # its own limit: a slow answer is not a failure, only the deadline is.
                statuses = self.node_status(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                continue
            if sum(status == "online" for status in statuses.values()) >= count:
                return
            for name, process in list(self._supernodes.items()):
                if process.poll() is None:
                    continue
                # Its API port was free when picked and taken before it bound it (Ray and other
                # SuperNodes open ports too): start it again on a new one, a few times at most.
                if PORT_TAKEN in self.log_path(name).read_text(errors="replace") and port_retries.get(name, 0) < 3:
                    port_retries[name] = port_retries.get(name, 0) + 1
                    self.start_supernode(name)
                    continue
                raise RuntimeError(f"SuperNode {name} exited with {process.returncode}; see {self.log_path(name)}")
            time.sleep(0.5)
        raise RuntimeError(f"Fewer than {count} SuperNodes came online within {timeout:.0f}s; see {self.workdir}/logs")

    # --- SuperNodes ---------------------------------------------------------------------------------

    def supernode_command(self, name: str, key: Path | None = None) -> list[str]:
        board = next((b for b in self.boards if b.name == name), Board(name))
        node_config = {"cache-dir": str(self.board_dir(name) / "cache"), **board.node_config}
        launcher = ["flower-supernode"]
        if board.python:  # an emulated board: slow to start its ClientApps (deploy/emulated_supernode.py)
            heartbeat = str(self.heartbeat_interval or 0)
            launcher = [*board.python, str(EMULATED_LAUNCHER), str(EMULATED_APP_START_SECONDS), heartbeat]
        elif self.heartbeat_interval is not None:
            launcher = [sys.executable, str(HEARTBEAT_LAUNCHER), str(self.heartbeat_interval)]
        command = [
            *launcher,
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--auth-supernode-private-key",
            str(key or self.credentials.board_private_key(name)),
            "--node-config",
            run_config_arg(node_config),
            # The SuperNode's own ClientApp API, loopback only; each board needs its own port here.
            "--port",
            str(free_port()),
            "--max-retries",
            "3",
        ]
        if self.insecure:
            return [*command, "--insecure"]
        return [*command, "--root-certificates", str(self.credentials.ca_certificate)]

    def start_supernode(self, name: str, key: Path | None = None) -> subprocess.Popen[bytes]:
        """Start (or restart) a board's SuperNode; ``key`` overrides its private key (tests)."""
        self._wait_until_offline(name)
        home = self.board_dir(name) / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        board = next((b for b in self.boards if b.name == name), Board(name))
        process = self._spawn(
            name,
            self.supernode_command(name, key),
            flower_env(home, {**(self.extra_env or {}), **board.env}),
        )
        self._supernodes[name] = process
        self._started.add(name)
        return process

    def _wait_until_offline(self, name: str) -> None:
        """Before a board starts again: the SuperLink refuses to activate a node it still counts online
        (the new SuperNode exits with code 305, "Failed to activate SuperNode"), and it counts a
        SuperNode that died without saying goodbye (killed, unplugged) online until it has missed two
        heartbeats. So wait until it counts the node offline: at most two heartbeat intervals."""
        node = self._node_ids.get(name)
        if name not in self._started or node is None or self.node_status().get(node) != "online":
            return  # a first start, or after a clean stop (a SuperNode deactivates its node as it exits)
        heartbeat = self.heartbeat_interval or HEARTBEAT_DEFAULT
        timeout = 2 * heartbeat + 30
        deadline = time.monotonic() + timeout
        while self.node_status().get(node) == "online":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink still counts {name} (node {node}) online after {timeout:.0f}s")
            # Each `flwr supernode list` is a Python process of its own: asking a few times per
            # heartbeat is enough, and leaves the cores to the run going on meanwhile.
            time.sleep(heartbeat / 4)

    def stop_supernode(self, name: str, kill: bool = False) -> None:
        """Stop a board's SuperNode and its ClientApp; ``kill`` pulls the plug (SIGKILL, no goodbye)."""
        process = self._supernodes.pop(name, None)
        if process is not None:
            stop_process(process, kill=kill)

    def supernode(self, name: str) -> subprocess.Popen[bytes]:
        return self._supernodes[name]

    # --- runs ------------------------------------------------------------------------------------------

    def submit(self, run_config: Mapping[str, Any], stream_to: TextIO | None = None) -> subprocess.Popen[str]:
        """``flwr run . <connection> --stream``; the caller reads or waits on the process."""
        command = ["flwr", "run", str(app_source(self.app_dir or PROJECT_ROOT)), CONNECTION, "--stream"]
        if run_config:
            command += ["--run-config", run_config_arg(run_config)]
        return subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=self.env,
            text=True,
            stdout=subprocess.PIPE if stream_to is None else stream_to,
            stderr=subprocess.STDOUT,
        )

    def _spawn(
        self, name: str, command: list[str], env: Mapping[str, str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        with self.log_path(name).open("ab") as log_file:
            return subprocess.Popen(
                command,
                cwd=cwd or self.board_dir(name),
                env=dict(env),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopping it stops its ClientApps too
            )


def _last_json(output: str) -> dict[str, Any]:
    """The JSON object Flower's CLI prints last with ``--format json``."""
    start = output.find("{")
    if start < 0:
        raise RuntimeError(f"Expected JSON from flwr, got:\n{output}")
    parsed = json.loads(output[start:])
    if not isinstance(parsed, dict):
        raise RuntimeError(f"Expected a JSON object from flwr, got:\n{output}")
    return parsed


def _boards(parser: Any, args: Any) -> list[Board]:
    """The boards ``deploy-local`` starts: x86 ones, then ``--arm-boards`` emulated ARM64 ones."""
    from deploy.arm64_userland import SetupError, require

    if not 0 <= args.arm_boards <= args.boards:
        parser.error(f"--arm-boards must be between 0 and --boards ({args.boards})")
    userland = None
    if args.arm_boards:
        try:
            userland = require()
        except SetupError as error:
            parser.error(f"--arm-boards: {error}")
    boards = []
    for index in range(args.boards):
        config: dict[str, Any] = {"partition-id": index, "num-partitions": args.boards}
        if args.data_root:
            folder = args.data_root.expanduser().resolve() / f"client-{index}"
            if not folder.is_dir():
                parser.error(f"{folder} does not exist: --data-root must hold client-0/ ... client-{args.boards - 1}/")
            config = {"data-dir": str(folder)}
        if userland is not None and index >= args.boards - args.arm_boards:
            boards.append(arm64_board(f"board-{index}-aarch64", config, userland))
        else:
            boards.append(Board(f"board-{index}", config))
    return boards


def main(argv: list[str] | None = None) -> int:
    """``edgesplit deploy-local``: the whole deployment on this machine, then one run (or serve)."""
    import argparse
    import signal
    import sys

    from deploy.simulate import parse_run_config

    parser = argparse.ArgumentParser(
        prog="edgesplit deploy-local",
        description="Start flower-superlink (TLS, SuperNode authentication) and one flower-supernode per "
        "board on this machine, each board with its own key, data and cache; submit one run and stop, "
        "or --serve and submit runs yourself.",
    )
    parser.add_argument("--boards", type=int, default=3, help="number of SuperNodes (default 3)")
    parser.add_argument(
        "--arm-boards",
        type=int,
        default=0,
        help="of these, how many run as emulated ARM64 boards (the last ones): flower-supernode installed with "
        "edgesplit[edge] on Debian's arm64 Python under qemu-aarch64 (set up once: python -m deploy.arm64_userland)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        help="folder holding client-<i>/ ImageFolders, one per board (default: ELPV, split over the boards)",
    )
    parser.add_argument("--workdir", type=Path, default=PROJECT_ROOT / ".deployment", help="keys, logs, caches")
    parser.add_argument("--run-config", default="", help="run-config overrides, Flower syntax")
    parser.add_argument("--serve", action="store_true", help="keep running until Ctrl-C instead of one run")
    parser.add_argument("--insecure", action="store_true", help="no TLS (loopback experiments only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    overrides = parse_run_config(args.run_config)
    if args.arm_boards and not args.data_root:  # an ARM board holds a folder, as a real one (deploy/elpv_folders.py)
        from deploy.elpv_folders import write_elpv_folders

        args.data_root = args.workdir.resolve() / "elpv-folders"
        overrides = write_elpv_folders(args.data_root, args.boards, overrides)
        print(f"ELPV split over {args.boards} boards written as image folders in {args.data_root}")
    boards = _boards(parser, args)
    if args.data_root and overrides.get("dataset") != DatasetKind.FOLDER:
        parser.error("--data-root needs --run-config \"dataset='folder' class-names='a,b' server-test-dir='...'\"")

    # SIGTERM stops as Ctrl-C does: every process this command started, the ServerApp included.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with LocalDeployment(args.workdir.resolve(), boards, insecure=args.insecure) as deployment:
            print(
                f"SuperLink on 127.0.0.1:{deployment.port} ({'INSECURE' if args.insecure else 'TLS'}), "
                f"{len(boards)} authenticated SuperNodes online; logs in {deployment.workdir / 'logs'}"
            )
            if args.serve:
                print(
                    f"Submit runs with:\n  FLWR_HOME={deployment.flwr_home} flwr run . {CONNECTION} --stream\n"
                    "Ctrl-C stops every process."
                )
                while True:
                    time.sleep(3600)
            run = deployment.submit(overrides, stream_to=sys.stdout)
            try:
                return run.wait()
            finally:
                if run.poll() is None:
                    run.terminate()
    except KeyboardInterrupt:
        print("Stopped: every process of this deployment has ended.", file=sys.stderr)
        return 130
