"""The run folder: config.json, events.jsonl (append-only), summary.json, the final head.

Everything here is written so that a reader (the dashboard, a person, a test) never sees half a
file: JSON documents are written to a temporary file and renamed; events are single lines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.kinds import EventKind

log = logging.getLogger(__name__)

# The numbers of a round-end event: mirrored into TensorBoard (tag "round/<key>"), and plotted by
# the dashboard (server/run_folder_view.py).
ROUND_NUMBERS = (
    "accuracy",
    "macro_f1",
    "balanced_accuracy",
    "loss",
    "client_accuracy",
    "bytes_down",
    "bytes_up",
    "seconds",
    "clients_ok",
    "clients_failed",
    "clients_rejected",
    "dp_epsilon",
)


def write_json_atomic(path: Path, document: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(json.dumps(_jsonable(document), indent=2, sort_keys=False) + "\n")
    temporary.replace(path)


def _jsonable(value: Any) -> Any:
    """Numbers JSON can hold: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    """Writes one run's folder ``<runs-dir>/<run-id>/``."""

    def __init__(self, run_dir: Path, resume: bool = False) -> None:
        """A new run folder, or (``resume``) an existing one whose events go on being appended."""
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=resume)
        self._events = (run_dir / "events.jsonl").open("a", buffering=1)
        self._lock = threading.Lock()
        self._tensorboard: Any = None  # a SummaryWriter, opened at the first round-end
        # Node id -> board name (the SuperNode's registered name): every event about a node names it.
        self.board_names: dict[int, str] = {}

    def write_config(self, document: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / "config.json", document)

    def event(self, kind: EventKind, **fields: Any) -> None:
        if "node" in fields and fields["node"] in self.board_names:
            fields["board"] = self.board_names[fields["node"]]
        line = json.dumps(_jsonable({"time": round(time.time(), 3), "event": kind, **fields}))
        with self._lock:
            self._events.write(line + "\n")
            if kind == EventKind.ROUND_END:
                self._scalars(fields)

    def _scalars(self, fields: dict[str, Any]) -> None:
        """The round's numbers as TensorBoard scalars, for users who live in TensorBoard."""
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is in the server extra; without it, no scalars
                log.warning("tensorboard is not installed: no TensorBoard scalars for this run")
                self._tensorboard = False
                return
            self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if self._tensorboard is False:
            return
        step = int(fields["round"])
        for key in ROUND_NUMBERS:
            value = fields.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                self._tensorboard.add_scalar(f"round/{key}", value, step)
        self._tensorboard.flush()

    def write_summary(self, document: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / "summary.json", document)

    def save_head(self, arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> Path:
        """The final global head as .npz (arrays by name) with its metadata as JSON beside it."""
        path = self.run_dir / "head.npz"
        temporary = self.run_dir / ".head.tmp.npz"
        np.savez(temporary, **arrays)  # type: ignore[arg-type]
        temporary.replace(path)
        write_json_atomic(self.run_dir / "head.json", metadata)
        return path

    def close(self) -> None:
        self._events.close()
        if self._tensorboard:
            self._tensorboard.close()


def new_run_id(flower_run_id: int | None, run_name: str = "") -> str:
    if run_name:
        return run_name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{flower_run_id}" if flower_run_id is not None else stamp
