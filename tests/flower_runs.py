"""Helpers for the tests that run the app through the real Flower simulation runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from client.privacy import AUDIT_LOG_ENV
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
