"""Helpers for the tests that run the app through the real Flower simulation runtime (``run_small``),
or through its real ServerApp and ClientApp in the test process (``run_in_process``): a runtime start
costs some 14 s and its ClientApp processes more, worth paying only where the runtime is under test."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from client import app as client_app
from client.privacy import AUDIT_LOG_ENV
from common.config import RunConfig
from common.flower_glue import act_as, mark_pushed
from deploy.local_simulation import flwr_run
from tests.conftest import with_server_engines

HEAD_SHAPES = {"classifier.weight": [4, 1280], "classifier.bias": [4]}
SMALL_RUN = {"subset": 160, "num-server-rounds": 2, "local-epochs": 2, "views": "none"}


def events_of(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def run_small(
    tmp: Path, name: str, cache: Path, engines: Path, extra: dict[str, Any] | None = None, clients: int = 3
) -> dict[str, Any]:
    with_server_engines(cache, engines)
    audit = tmp / f"{name}-audit.jsonl"
    config = {**SMALL_RUN, "cache-dir": str(cache), "runs-dir": str(tmp / "runs"), "run-name": name, **(extra or {})}
    result = flwr_run(config, clients, tmp / "flwr-home", env={AUDIT_LOG_ENV: str(audit)}, timeout=600)
    run_dir = tmp / "runs" / name
    assert result.returncode == 0, result.stdout[-4000:]
    assert (run_dir / "summary.json").is_file(), result.stdout[-4000:]
    return {
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "events": events_of(run_dir),
        "audit": [json.loads(line) for line in audit.read_text().splitlines()],
        "output": result.stdout,
        "run_dir": run_dir,
    }


class InProcessFlower(Grid):
    """Flower's runtime without its processes, for checks that do not test the runtime itself: the
    real ServerApp (``server.app.main``, its PromptGrid and round loop) pushes messages to nodes
    1..n, and each is answered at once by the real ClientApp object (``client.app.app``: its mods,
    the fault injector and privacy guard included), as the simulation's node ``partition-id``
    node - 1 would answer it. An exception in the ClientApp becomes the error reply the simulation
    makes of it. ``test_flower_runtime.py`` and ``test_faults_runtime.py`` run the runtime itself."""

    def __init__(self, run_config: dict[str, Any], nodes: int) -> None:
        self.contexts = {
            node: Context(
                run_id=RUN_ID,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": nodes},
                state=RecordDict(),
                run_config=run_config,
            )
            for node in range(1, nodes + 1)
        }
        self.replies: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:
        raise NotImplementedError  # (the runtime's; the ServerApp does not call it)

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def get_nodes(self) -> list[Any]:
        return []  # the simulation's nodes are not registered under names

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            mark_pushed(message)  # what Flower does on push
            self.replies[message.object_id] = self._answer(message)
            ids.append(message.object_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        act_as(node, run_id=RUN_ID)  # the replying node, as in its ClientApp process
        try:
            reply = client_app.app(message, self.contexts[node])
        except Exception as error:  # the error reply Flower's simulation makes of it
            reason = f"<class 'ClientAppException'>:<'\nException ClientAppException occurred. Message: {error}'>"
            reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        finally:
            act_as(0, run_id=RUN_ID)
        mark_pushed(reply)
        return reply


RUN_ID = 1
CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode's, for an exception in the ClientApp


def run_in_process(
    tmp: Path,
    name: str,
    cache: Path,
    engines: Path,
    extra: dict[str, Any] | None = None,
    clients: int = 3,
    expect_ok: bool = True,
) -> dict[str, Any]:
    """``run_small`` through ``InProcessFlower``: the same settings and the same result, minus the
    runtime; ``output`` holds the ServerApp's and ClientApps' log lines, ``stopped`` the RunStopped
    the ServerApp raised (None when it finished; ``expect_ok``: it must)."""
    from server.app import main as server_main
    from server.nodes import RunStopped

    with_server_engines(cache, engines)
    audit = tmp / f"{name}-audit.jsonl"
    overrides = {**SMALL_RUN, "cache-dir": str(cache), "runs-dir": str(tmp / "runs"), "run-name": name, **(extra or {})}
    run_config = {**RunConfig().to_flower(), **overrides}  # what Flower hands the apps: pyproject's table, overridden
    lines: list[str] = []
    capture = _ListHandler(lines)
    loggers = [logging.getLogger(package) for package in ("server", "client", "common")]
    # the ServerApp routes these through Flower's handlers (common/logs.py): as they were, after
    saved = [(logger.level, logger.propagate, list(logger.handlers)) for logger in loggers]
    stopped = None
    previous_audit = os.environ.get(AUDIT_LOG_ENV)
    os.environ[AUDIT_LOG_ENV] = str(audit)
    act_as(0, run_id=RUN_ID)  # as the ServerApp's runtime sets
    try:
        for logger in loggers:
            logger.addHandler(capture)
        server_main(InProcessFlower(run_config, clients), Context(RUN_ID, 0, {}, RecordDict(), run_config))
    except RunStopped as stop:
        stopped = stop
    finally:
        for logger, (level, propagate, handlers) in zip(loggers, saved, strict=True):
            logger.setLevel(level)
            logger.propagate = propagate
            logger.handlers[:] = handlers
        if previous_audit is None:
            os.environ.pop(AUDIT_LOG_ENV, None)
        else:
            os.environ[AUDIT_LOG_ENV] = previous_audit
    run_dir = tmp / "runs" / name  # (a resumed run writes to the folder it resumes instead)
    assert stopped is None or not expect_ok, "\n".join(lines[-40:])
    return {
        "summary": json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None,
        "events": events_of(run_dir) if (run_dir / "events.jsonl").is_file() else [],
        "audit": [json.loads(line) for line in audit.read_text().splitlines()] if audit.is_file() else [],
        "output": "\n".join(lines),
        "run_dir": run_dir,
        "stopped": stopped,
    }


class _ListHandler(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")
