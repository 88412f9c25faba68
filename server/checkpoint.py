"""The server's checkpoint: everything a restarted server needs to go on from the last completed
round, in one file written atomically (``<run>/checkpoint/latest.npz``).

One ``.npz`` holds the global head (``head/<name>``), the strategy's own state (``strategy/<attr>/
<name>``, e.g. FedAdam's moments) and a JSON document (``meta``): the round, the fingerprint,
the class list, the strategy, the RNG state Flower samples nodes with, the rounds so far, and in a
DP run the noise multiplier of every release so far (the budget is counted from these, not from the
round records: a round may release its head and stop before it is recorded).
Plain Python and NumPy; no Flower imports.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from server.ledger import RoundRecord

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "latest.npz"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to a different run setup."""


@dataclass
class Checkpoint:
    round: int  # the last completed round
    head: dict[str, np.ndarray]
    fingerprint: str
    classes: tuple[str, ...]
    strategy: str
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    random_state: Any = None  # random.getstate() as JSON-able lists
    rounds: list[dict[str, Any]] = field(default_factory=list)  # summary.json's rounds so far
    totals: dict[str, Any] = field(default_factory=dict)  # embedding counts, the federation's class counts
    dp_releases: list[float] = field(default_factory=list)  # the noise multiplier of every DP release so far

    def save(self, run_dir: Path) -> Path:
        """Write then rename: a crash leaves the previous checkpoint whole."""
        directory = run_dir / CHECKPOINT_DIR
        directory.mkdir(exist_ok=True)
        arrays = {f"head/{name}": value for name, value in self.head.items()}
        for attribute, state in self.strategy_state.items():
            arrays.update({f"strategy/{attribute}/{name}": value for name, value in state.items()})
        meta = {
            "format": FORMAT_VERSION,
            "round": self.round,
            "fingerprint": self.fingerprint,
            "classes": list(self.classes),
            "strategy": self.strategy,
            "random_state": self.random_state,
            "rounds": self.rounds,
            "totals": self.totals,
            "dp_releases": self.dp_releases,
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path = directory / CHECKPOINT_FILE
        temporary = directory / f".{CHECKPOINT_FILE}.tmp{os.getpid()}"
        with temporary.open("wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
        return path

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint:
        path = checkpoint_path(run_dir)
        if not path.is_file():
            raise CheckpointError(
                f"No checkpoint in {str(run_dir)!r} (expected {path}). 'resume-from' must name the folder of "
                "a run that completed at least one round, e.g. resume-from='runs/<run-id>'."
            )
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = json.loads(stored["meta"].tobytes().decode())
                head: dict[str, np.ndarray] = {}
                strategy_state: dict[str, dict[str, np.ndarray]] = {}
                for key in stored.files:
                    kind, _, rest = key.partition("/")
                    if kind == "head":
                        head[rest] = stored[key]
                    elif kind == "strategy":
                        attribute, _, name = rest.partition("/")
                        strategy_state.setdefault(attribute, {})[name] = stored[key]
        except Exception as error:  # truncated or foreign file
            raise CheckpointError(f"Checkpoint {path} is unreadable ({type(error).__name__}: {error}).") from error
        version = meta.get("format") if isinstance(meta, dict) else None
        if version != FORMAT_VERSION:
            raise CheckpointError(f"Checkpoint {path} has format {version}, expected {FORMAT_VERSION}.")
        try:
            return cls(
                round=int(meta["round"]),
                head=head,
                fingerprint=str(meta["fingerprint"]),
                classes=tuple(meta["classes"]),
                strategy=str(meta["strategy"]),
                strategy_state=strategy_state,
                random_state=meta["random_state"],
                rounds=list(meta["rounds"]),
                totals=dict(meta["totals"]),
                dp_releases=[
                    float(z) for z in meta.get("dp_releases", [])
                ],  # none in a checkpoint from before they were kept
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"Checkpoint {path} has a malformed description ({type(error).__name__}: {error}); resume from an "
                "intact checkpoint, or start a new run without 'resume-from'."
            ) from error

    def check_content(self, run_dir: Path, head_shapes: Mapping[str, tuple[int, ...]], num_rounds: int) -> None:
        """Refuse a checkpoint whose head does not fit this run's (names, shapes), holds NaN, Inf or
        a non-float array (head or strategy state), or whose round lies outside the run: a
        resumed run would otherwise aggregate into a forged or broken head."""
        path = checkpoint_path(run_dir)
        fix = "Resume from an intact checkpoint of this run, or start a new run without 'resume-from'."
        if set(self.head) != set(head_shapes):
            raise CheckpointError(
                f"Checkpoint {path} holds head arrays {sorted(self.head)}, this run's head has {sorted(head_shapes)}. "
                f"Resume with the same 'head', 'cut' and 'mlp-hidden'. {fix}"
            )
        for name, shape in head_shapes.items():
            if tuple(self.head[name].shape) != tuple(shape):
                raise CheckpointError(
                    f"Checkpoint {path}: head array {name!r} has shape {tuple(self.head[name].shape)}, this run's "
                    f"head needs {tuple(shape)}. Resume with the same 'head', 'cut' and 'mlp-hidden'. {fix}"
                )
        arrays = {f"head/{n}": a for n, a in self.head.items()}
        arrays.update({f"strategy/{k}/{n}": a for k, state in self.strategy_state.items() for n, a in state.items()})
        for name, array in arrays.items():
            if array.dtype.kind != "f" or not np.all(np.isfinite(array)):
                raise CheckpointError(f"Checkpoint {path}: {name} is not a finite float array. {fix}")
        if not 1 <= self.round <= num_rounds:
            raise CheckpointError(
                f"Checkpoint {path} is after round {self.round}, outside this run's rounds 1..{num_rounds}. "
                f"Set num-server-rounds to at least {max(self.round, 1)} to go on from it. {fix}"
            )
        known = {f.name for f in fields(RoundRecord)}
        if len(self.rounds) > self.round or any(not isinstance(r, dict) or set(r) - known for r in self.rounds):
            raise CheckpointError(f"Checkpoint {path}: its round records do not match its round {self.round}. {fix}")

    def dp_releases_so_far(self, run_dir: Path) -> list[float]:
        """The noise multiplier of every DP release the checkpointed run made, for a DP run that goes
        on from it. Every completed round of a DP run released its head once, so a count below the
        round (a checkpoint that lost its releases, or one from before they were kept whose round
        records are short) would spend the budget again from less than was spent: refused."""
        path = checkpoint_path(run_dir)
        releases = self.dp_releases or [float(r.get("dp_noise_multiplier", 0.0)) for r in self.rounds]
        if len(releases) < self.round or not all(math.isfinite(z) and z > 0 for z in releases):
            raise CheckpointError(
                f"Checkpoint {path} counts {len(releases)} DP release(s) with a positive noise multiplier for its "
                f"{self.round} completed round(s), and every round of a DP run releases its head once: the budget "
                "spent cannot be known. Resume from an intact checkpoint of this run, or start a new run without "
                "'resume-from'."
            )
        return releases

    def check_matches(self, fingerprint: str, classes: tuple[str, ...], strategy: str) -> None:
        """Refuse to continue a run whose backbone, classes or strategy differ from this one's."""
        if fingerprint != self.fingerprint:
            raise CheckpointError(
                f"The checkpoint was made with backbone fingerprint {self.fingerprint[:12]}, this run's backbone "
                f"is {fingerprint[:12]}: its head does not fit these features. Resume with the same 'backbone', "
                "'backbone-weights', 'image-size' and 'crop-pct', or start a new run without 'resume-from'."
            )
        if tuple(classes) != self.classes:
            raise CheckpointError(
                f"The checkpoint's classes are {list(self.classes)}, this run's are {list(classes)}. Resume with "
                "the same dataset, 'elpv-task' or 'class-names', or start a new run without 'resume-from'."
            )
        if strategy != self.strategy:
            raise CheckpointError(
                f"The checkpoint was made by strategy '{self.strategy}', this run asks for '{strategy}'; its state "
                f"cannot carry over. Resume with strategy='{self.strategy}'."
            )


def count_releases(run_dir: Path, releases: list[float]) -> None:
    """Make the run's checkpoint count every DP release made: a run stopped after a round released
    its head (which the run leaves in head.npz) but before the round was checkpointed goes on from
    the round before, and its budget must include that release. Nothing without a checkpoint."""
    if not checkpoint_path(run_dir).is_file():
        return
    checkpoint = Checkpoint.load(run_dir)
    if len(checkpoint.dp_releases) < len(releases):
        checkpoint.dp_releases = list(releases)
        checkpoint.save(run_dir)


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE


def random_state_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def random_state_from_json(document: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = document
    return (version, tuple(internal), gauss)
