"""The wire protocol: every message edgesplit sends, typed, in one place (DESIGN.md, wire protocol).

Server -> client
    ``train`` / ``evaluate``: ``arrays`` (the trainable part: the head, and the backbone's tail at
    a later cut), ``config`` (``Instructions``), and ``backbone`` (the frozen part as the node's
    engine runs it) with ``golden`` (``GoldenBatch``: a few of the server's own held-out images and
    the features the server's fp32 backbone computes for them) only for a node that does not hold
    that variant yet.
    ``query``: ``config`` holds an ``action``. ``backbone-status`` (``BackboneQuery``) asks which
    engine the node runs and which variant it holds; ``class-sums`` (FedNCM) carries a train
    message's content and asks for ``ClassStats``; ``ridge-sums`` (Fed3R) likewise asks for
    ``RidgeStats``; ``class-counts`` (class balance without either) for ``ClassCounts``.
Client -> server
    ``arrays`` (the trainable part, after train only), ``metrics`` (numbers only, with
    ``num-examples``; the keys below) and ``status`` (``ReplyStatus``, or ``BackboneStatus`` to a
    status query); to the FedNCM query, ``class-stats`` (``ClassStats``); to Fed3R's,
    ``ridge-stats`` (``RidgeStats``); to the counts query, ``class-counts``. Never images, never
    embeddings, never anything per sample.

Each message is a frozen dataclass whose ``to_record`` / ``from_record`` are derived from its
fields (``snake_case`` field, ``kebab-case`` key). Plain Python: the Flower records are made in
``common/flower_glue.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, Self

import numpy as np

from common.board_text import board_text
from common.config import RunConfig
from common.kinds import ClassBalance, EngineName, HeadKind, kind_values
from common.preprocess import PreprocessSpec
from common.views import VIEWS

# --- record names inside a message's RecordDict ------------------------------------------------
ARRAYS = "arrays"
CONFIG = "config"
BACKBONE = "backbone"
METRICS = "metrics"
STATUS = "status"
CLASS_STATS = "class-stats"
RIDGE_STATS = "ridge-stats"
CLASS_COUNTS = "class-counts"
GOLDEN = "golden"

# --- metric keys (client -> server, all numbers) ----------------------------------------------
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
TRAIN_SECONDS = "train-seconds"
EMBED_SECONDS = "embed-seconds"
EMBEDDINGS_COMPUTED = "embeddings-computed"  # of this node's images, by the process that embedded them
EMBEDDINGS_CACHED = "embeddings-cached"
IMAGES_SKIPPED = "images-skipped"
CLASSES_MISSING = "classes-missing"  # run classes with no local image (names go in the status's data notes)
BACKBONE_RECEIVED = "backbone-received"
LOSS = "loss"
ACCURACY = "accuracy"
MACRO_F1 = "macro-f1"
PERSONAL_ACCURACY = "personal-accuracy"  # the personal head on the same local test share
PERSONAL_MACRO_F1 = "personal-macro-f1"
PEAK_RSS_MB = "peak-rss-mb"  # device telemetry: the ClientApp process's memory high-water mark
CPU_TEMP_C = "cpu-temp-c"  # device telemetry, only where the board exposes a CPU thermal zone
# Device telemetry: seconds since the replying process started. Deployed, that is one ClientApp
# process per message, so it is the board's whole time for the message (start-up included).
PROCESS_SECONDS = "process-seconds"

EMBEDDING_METRICS = (EMBED_SECONDS, EMBEDDINGS_COMPUTED, EMBEDDINGS_CACHED, IMAGES_SKIPPED)
TELEMETRY_METRICS = (PEAK_RSS_MB, CPU_TEMP_C, PROCESS_SECONDS)
# Counts a reply makes: finite, non-negative and below COUNT_LIMIT, or the reply is rejected.
COUNT_METRICS = (NUM_EXAMPLES, EMBEDDINGS_COMPUTED, EMBEDDINGS_CACHED, IMAGES_SKIPPED, CLASSES_MISSING)
COUNT_LIMIT = 1e9

# The code of an error reply from a node that cannot take part as configured: its data (a missing
# folder, a split that cannot be made) or its node config. The reason says how to fix it; a retry
# cannot, so the server reports it once and does not retry a round for it. (Flower's own codes are
# below 100.)
SETUP_ERROR_CODE = 100
# The code of an error reply from a node that refuses what it was asked: instructions that change
# the run it agreed to, a query its run does not ask, statistics below its floor
# (client/agreement.py). The server records the refusal, once per reason, and does not retry for it.
REFUSAL_CODE = 101

# The closed list of metric names a reply of each message kind may carry (client/privacy.py
# refuses any other): a new metric is added here, beside its constant, or it does not leave.
TRAIN_METRICS = (
    NUM_EXAMPLES,
    TRAIN_LOSS,
    TRAIN_ACCURACY,
    TRAIN_SECONDS,
    CLASSES_MISSING,
    BACKBONE_RECEIVED,
    *EMBEDDING_METRICS,
    *TELEMETRY_METRICS,
)
EVALUATE_METRICS = (
    NUM_EXAMPLES,
    LOSS,
    ACCURACY,
    MACRO_F1,
    PERSONAL_ACCURACY,
    PERSONAL_MACRO_F1,
    BACKBONE_RECEIVED,
    *EMBEDDING_METRICS,
    *TELEMETRY_METRICS,
)
QUERY_METRICS = (NUM_EXAMPLES, BACKBONE_RECEIVED, *EMBEDDING_METRICS, *TELEMETRY_METRICS)  # FedNCM's class sums
# By Flower message type ("train", "evaluate", "query"; common/ imports no flwr).
REPLY_METRICS: dict[str, tuple[str, ...]] = {
    "train": TRAIN_METRICS,
    "evaluate": EVALUATE_METRICS,
    "query": QUERY_METRICS,
}
# Scores lie in [0, 1]; durations in seconds below a week (a board that says it took longer is
# broken or lying, and a sum of such numbers must stay finite).
SCORE_METRICS = (TRAIN_ACCURACY, ACCURACY, MACRO_F1, PERSONAL_ACCURACY, PERSONAL_MACRO_F1)
SECONDS_METRICS = (TRAIN_SECONDS, EMBED_SECONDS, PROCESS_SECONDS)
SECONDS_LIMIT = 7 * 86_400.0
# Every number the server knows the meaning of, with the range it must lie in (both ends included).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    **{key: (0.0, COUNT_LIMIT) for key in COUNT_METRICS},
    **{key: (0.0, 1.0) for key in SCORE_METRICS},
    **{key: (0.0, SECONDS_LIMIT) for key in SECONDS_METRICS},
    TRAIN_LOSS: (0.0, 1e6),
    LOSS: (0.0, 1e6),
    BACKBONE_RECEIVED: (0.0, 1.0),
    PEAK_RSS_MB: (0.0, 1e7),
    CPU_TEMP_C: (-100.0, 200.0),
}
# A fingerprint is a sha256 digest in hex (common/backbones.py, common/engines.py): it names
# files on the boards, so nothing else is accepted.
FINGERPRINT = re.compile(r"[0-9a-f]{64}")

# The ONNX engines' backbone record holds the model file's bytes under this name.
ONNX_MODEL = "model.onnx"
# The names inside every ONNX model the server makes: the backbone variants' input and output,
# and the exported model's outputs and its description file (common/export.py).
ONNX_INPUT = "images"
ONNX_OUTPUT = "features"
LOGITS = "logits"
PROBABILITIES = "probabilities"
MODEL_INFO = "model.json"
# The key of the query action in a query's config record.
ACTION = "action"
# Flower's strategies put the round into every config record under this key.
SERVER_ROUND = "server-round"


class Phase(StrEnum):
    """What a message to a node asks for, one kind for both sides: a train or an evaluate message
    (the value is Flower's message type), or a query (the value is its config record's ``action``,
    one of ``QUERIES``). The server screens and counts replies per phase; a board answers a query
    by its action (``query_action``)."""

    TRAIN = "train"
    EVALUATE = "evaluate"
    BACKBONE_STATUS = "backbone-status"  # which engine a node runs and which backbone variant it holds
    CLASS_SUMS = "class-sums"  # FedNCM's one-shot query before round 1
    RIDGE_SUMS = "ridge-sums"  # Fed3R's one-shot query before round 1
    CLASS_COUNTS = "class-counts"  # class balance's counts-only query (when no statistics give them)


# The phases that travel as a query message, told apart by their action.
QUERIES = (Phase.BACKBONE_STATUS, Phase.CLASS_SUMS, Phase.RIDGE_SUMS, Phase.CLASS_COUNTS)
# The record each one-shot query's statistics travel in.
STATISTICS_RECORDS = {Phase.CLASS_SUMS: CLASS_STATS, Phase.RIDGE_SUMS: RIDGE_STATS, Phase.CLASS_COUNTS: CLASS_COUNTS}


class ProtocolError(ValueError):
    """A message lacks a key or holds a value of the wrong type: a different edgesplit version,
    or a message that was not made by edgesplit."""


def query_action(record: Mapping[str, Any]) -> Phase:
    """What a query's config record asks for (one of ``QUERIES``)."""
    action = record.get(ACTION)
    if isinstance(action, str) and action in QUERIES:
        return Phase(action)
    raise ProtocolError(
        f"Unknown query action {action!r}; known: {[ask.value for ask in QUERIES]}. "
        "Is the server the same edgesplit version?"
    )


# --- typed config records ------------------------------------------------------------------------


def _key(name: str) -> str:
    return name.replace("_", "-")


def _encode(value: Any) -> Any:
    if isinstance(value, StrEnum):
        return value.value  # the plain string
    if isinstance(value, PreprocessSpec):
        return value.to_json()
    if isinstance(value, tuple):
        return list(value)
    return value


def _decode(kind: Any, value: Any, key: str) -> Any:
    """``value`` as a field of type ``kind``, or ProtocolError."""
    if kind is PreprocessSpec:
        if isinstance(value, str):
            try:
                return PreprocessSpec.from_json(value)
            except (ValueError, TypeError, KeyError) as error:
                raise ProtocolError(f"Message key {key!r} is not a preprocessing spec: {error}") from None
    elif typing.get_origin(kind) is tuple:
        item_kind = typing.get_args(kind)[0]
        if item_kind is float and isinstance(value, list | tuple):
            if all(isinstance(item, int | float) and not isinstance(item, bool) for item in value):
                return tuple(float(item) for item in value)
        elif isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
            return tuple(value)
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(kind, type) and issubclass(kind, StrEnum):
        if isinstance(value, str) and value in kind_values(kind):
            return kind(value)
        raise ProtocolError(f"Message key {key!r} must be one of {kind_values(kind)}, got {value!r}.")
    elif isinstance(value, kind):
        return value
    shown = board_text(repr(value), 200)  # the other side's value, in a message this side may log
    raise ProtocolError(f"Message key {key!r} must be {getattr(kind, '__name__', kind)}, got {shown}.")


class ConfigMessage:
    """A frozen dataclass that travels as a flat config record (see the module docstring)."""

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(_key(f.name) for f in fields(cls))  # type: ignore[arg-type]

    def to_record(self) -> dict[str, Any]:
        """The record's content: bools, ints, floats, strings and lists of strings."""
        return {_key(f.name): _encode(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Self:
        """Read the fields from a record; other keys are ignored (Flower adds its own)."""
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            key = _key(f.name)
            if key not in record:
                if f.default is not dataclasses.MISSING:
                    continue
                raise ProtocolError(f"{cls.__name__} lacks key {key!r}; is the other side the same edgesplit version?")
            values[f.name] = _decode(hints[f.name], record[key], key)
        message = cls(**values)
        message.check()
        return message

    def check(self) -> None:
        """Raise ProtocolError for a value this side must not act on (a received message is
        checked once, here; messages made in code are trusted)."""


@dataclass(frozen=True)
class Instructions(ConfigMessage):
    """What the server asks of a node in a train, evaluate or class-sums message."""

    server_round: int
    fingerprint: str  # the backbone's (weights + preprocessing)
    backbone_name: str
    preprocess: PreprocessSpec
    engine: EngineName  # the engine this node runs (per node)
    engine_fingerprint: str  # that engine's variant of the backbone (per node)
    head: HeadKind
    mlp_hidden: int
    cut: int  # backbone stages after the cut, trained with the head
    views: tuple[str, ...]  # the views embedded and trained on (common/views.py)
    average_views: bool  # evaluate on the mean prediction over the views
    num_classes: int
    local_epochs: int
    learning_rate: float
    weight_decay: float
    batch_size: int
    seed: int
    personal_epochs: int  # > 0: fine-tune and score a personal head at evaluation
    ncm_min_examples: int  # also Fed3R's floor of examples per class
    proximal_mu: float = 0.0  # also the key Flower's FedProx writes
    dp_clipping_norm: float = 0.0  # > 0: clip the update to this L2 norm before replying (client/dp_clipping.py)
    class_balance: ClassBalance = ClassBalance.NONE  # common/balance.py
    logit_adjust_tau: float = 1.0
    class_prior: tuple[float, ...] = ()  # the federation's class shares (from its counts); () if unknown
    local_prior_correction: bool = False  # train on logits + log(local prior / class_prior)

    @classmethod
    def from_run_config(cls, config: RunConfig, **values: Any) -> Instructions:
        """Instructions with every field shared with the run config taken from ``config``, the
        others (and any override, e.g. the round's learning rate) from ``values``."""
        shared = {key: getattr(config, key) for key in _shared_with_run_config()}
        return cls(**{**shared, **values})

    def check(self) -> None:
        """A board acts only on instructions its own run-config schema allows: fingerprints that
        can only name files inside its cache, a known backbone and views (the engine, the head and
        the class balance are known kinds once decoded), and every hyperparameter within the range
        the board would accept in its own run config."""
        check_fingerprint(self.fingerprint, "fingerprint")
        check_fingerprint(self.engine_fingerprint, "engine-fingerprint")
        unknown = [view for view in self.views if view not in VIEWS]
        if unknown or not self.views:
            raise ProtocolError(f"Instruction 'views' names unknown views {unknown}; known: {list(VIEWS)}.")
        numbers = [self.preprocess.crop_pct, *self.preprocess.mean, *self.preprocess.std]
        if not all(math.isfinite(x) for x in numbers) or min(abs(x) for x in self.preprocess.std) < 1e-6:
            raise ProtocolError(f"Instruction 'preprocess' holds an unusable normalisation: {self.preprocess}.")
        prior = self.class_prior
        if prior and (len(prior) != self.num_classes or not all(math.isfinite(p) and p >= 0 for p in prior)):
            raise ProtocolError(f"Instruction 'class-prior' must be {self.num_classes} non-negative shares.")
        schema = {f.name: f for f in fields(RunConfig)}  # type: ignore[arg-type]
        _check_range("server-round", self.server_round, 0, schema["num_server_rounds"].metadata["high"])
        _check_range("num-classes", self.num_classes, 1, 100_000)
        _check_range("image-size", self.preprocess.image_size, **_limits(schema["image_size"]))
        shared = ((key, getattr(self, key)) for key in _shared_with_run_config())
        for name, value in (("backbone", self.backbone_name), *shared):
            rules = schema[name].metadata
            choices = rules.get("choices")
            if callable(choices):
                choices = choices()
            if choices is not None and value not in choices:
                raise ProtocolError(f"Instruction {_key(name)!r} must be one of {list(choices)}, got {value!r}.")
            if rules.get("low") is not None or rules.get("high") is not None:
                _check_range(_key(name), value, **_limits(schema[name]))


# Instructions fields named as a run-config key that mean something else: the engine this node runs
# (the run's may be "auto") and the views resolved from the run's ``views``.
_NOT_THE_RUN_CONFIG = frozenset({"engine", "views"})


@functools.cache  # fixed by the two dataclasses: read on every message a board decodes
def _shared_with_run_config() -> tuple[str, ...]:
    """The Instructions fields that are run-config keys of the same meaning: copied from the run
    config by ``Instructions.from_run_config`` and held to its schema by ``Instructions.check``."""
    run_keys = {f.name for f in fields(RunConfig)}  # type: ignore[arg-type]
    return tuple(f.name for f in fields(Instructions) if f.name in run_keys and f.name not in _NOT_THE_RUN_CONFIG)


def _limits(field: dataclasses.Field[Any]) -> dict[str, float | None]:
    return {"low": field.metadata.get("low"), "high": field.metadata.get("high")}


def _check_range(key: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise ProtocolError(
            f"Instruction {key!r} must be in [{low}, {high}], got {value!r}; the server is not trusted "
            "beyond what this board's own run-config schema allows."
        )


def check_fingerprint(value: str, key: str = "fingerprint") -> str:
    """``value`` if it is a sha256 digest in hex, else ProtocolError: a fingerprint becomes a
    file name on the board, so a crafted one (``../``, a path) must never reach the disk."""
    if not FINGERPRINT.fullmatch(value):
        raise ProtocolError(f"Message key {key!r} must be 64 lowercase hex digits (a sha256), got {value[:80]!r}.")
    return value


@dataclass(frozen=True)
class BackboneQuery(ConfigMessage):
    """Which engine does the node run, and which variant of this backbone (at this cut) does it hold?"""

    fingerprint: str
    cut: int
    action: Phase = Phase.BACKBONE_STATUS

    def check(self) -> None:
        if self.action != Phase.BACKBONE_STATUS:
            raise ProtocolError(
                f"A backbone query's 'action' is {Phase.BACKBONE_STATUS.value!r}, got {self.action.value!r}."
            )
        check_fingerprint(self.fingerprint)
        _check_range("cut", self.cut, **_limits(next(f for f in fields(RunConfig) if f.name == "cut")))


class BoardMessage(ConfigMessage):
    """A message a board sends: each of its strings is the board's to choose, so the server reads it
    capped and without control characters (``common/board_text.py``), before it logs, stores or
    shows any of it."""

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Self:
        message = super().from_record(record)
        named = {f.name: getattr(message, f.name) for f in fields(message)}  # type: ignore[arg-type]
        cleaned = {name: board_text(value) for name, value in named.items() if isinstance(value, str)}
        return dataclasses.replace(message, **cleaned)  # type: ignore[type-var]


@dataclass(frozen=True)
class BackboneStatus(BoardMessage):
    """A node's answer to ``BackboneQuery``: its engine and the variant fingerprint it holds ("" if none)."""

    engine: str
    held_fingerprint: str
    golden_cosine: float = -1.0  # of the held variant on the golden batch (-1: not checked yet)
    fallback: str = ""  # why the node runs a safer engine than it was set to ("" if it does not)

    def check(self) -> None:
        check_cosine(self.golden_cosine)


def check_cosine(value: float) -> None:
    """A golden cosine is a cosine, or -1 (not checked): NaN or 1e308 would pass a < comparison."""
    if not (math.isfinite(value) and -1.0 <= value <= 1.0):
        raise ProtocolError(f"Status key 'golden-cosine' must be a cosine in [-1, 1], got {value!r}.")


@dataclass(frozen=True)
class ReplyStatus(BoardMessage):
    """What a node says about itself with every train, evaluate and class-sums reply."""

    fingerprint: str  # the backbone it used
    engine: str
    engine_fingerprint: str
    data_notes: str = ""  # what it skipped or lacks (short, no per-image content)
    golden_cosine: float = -1.0  # its engine's agreement with the server on the golden batch (-1: unchecked)
    fallback: str = ""  # set when its engine failed the golden check: what it does about it
    machine: str = ""  # the board's CPU architecture, platform.machine(): x86_64, aarch64 ("": an older node)

    def check(self) -> None:
        check_cosine(self.golden_cosine)


# --- array messages ------------------------------------------------------------------------------


class ArrayMessage:
    """A frozen dataclass of arrays that travels as one array record: each field an array of the
    same name. ``from_arrays`` takes exactly those names (ProtocolError otherwise) and runs
    ``check``."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.names()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Self:
        if set(arrays) != set(cls.names()):
            raise ProtocolError(
                f"{cls.__name__} must hold exactly the arrays {sorted(cls.names())}, got {sorted(arrays)}"
            )
        message = cls(**{name: np.asarray(arrays[name]) for name in cls.names()})
        message.check()
        return message

    def check(self) -> None:
        """Raise ProtocolError for arrays this side must not act on."""


@dataclass(frozen=True)
class ClassStats(ArrayMessage):
    """FedNCM's reply: per class, the sum of the classifier's input features over the node's
    training images (classes below the privacy floor as zeros), and the counts."""

    sums: np.ndarray  # (classes, feature_dim)
    counts: np.ndarray  # (classes,)

    @classmethod
    def shapes(cls, num_classes: int, feature_dim: int) -> dict[str, tuple[int, ...]]:
        return {"sums": (num_classes, feature_dim), "counts": (num_classes,)}


@dataclass(frozen=True)
class ClassCounts(ArrayMessage):
    """The counts-only query's reply: how many training images of each class the node holds."""

    counts: np.ndarray  # (classes,)

    @classmethod
    def shapes(cls, num_classes: int) -> dict[str, tuple[int, ...]]:
        return {"counts": (num_classes,)}


@dataclass(frozen=True)
class RidgeStats(ArrayMessage):
    """Fed3R's reply: sums over the node's training images (each image's views averaged) of the
    features the classifier's last layer sees, z: the Gram matrix sum z z^T as its upper triangle
    (row by row, float32: half the bytes of the full matrix), per class the sum of z, and the
    counts. Classes below the privacy floor are left out of all three."""

    gram: np.ndarray  # (dim * (dim + 1) / 2,)
    sums: np.ndarray  # (classes, dim)
    counts: np.ndarray  # (classes,)

    @classmethod
    def shapes(cls, num_classes: int, dim: int) -> dict[str, tuple[int, ...]]:
        return {"gram": (dim * (dim + 1) // 2,), "sums": (num_classes, dim), "counts": (num_classes,)}

    @staticmethod
    def pack(gram: np.ndarray) -> np.ndarray:
        """A symmetric matrix's upper triangle, row by row."""
        return gram[np.triu_indices(len(gram))]

    def full_gram(self) -> np.ndarray:
        """The symmetric (dim, dim) Gram matrix, float64."""
        dim = self.sums.shape[1]
        gram = np.zeros((dim, dim))
        gram[np.triu_indices(dim)] = self.gram
        return gram + np.triu(gram, 1).T


@dataclass(frozen=True)
class GoldenBatch(ArrayMessage):
    """A few of the server's own held-out images, preprocessed (float16 to travel light), and the
    features its fp32 backbone computes for them (from the same float16 values): the yardstick a
    node holds its engine to. Never a client's data."""

    images: np.ndarray  # (n, 3, size, size) float16
    features: np.ndarray  # (n, ...) float32: the backbone's output at the cut

    def check(self) -> None:
        if self.images.ndim != 4 or len(self.images) == 0 or len(self.features) != len(self.images):
            raise ProtocolError(
                f"golden batch of shapes {self.images.shape} and {self.features.shape} does not pair up"
            )
        if not (np.isfinite(self.images).all() and np.isfinite(self.features).all()):
            raise ProtocolError("golden batch holds NaN or Inf")

    def cosine(self, computed: np.ndarray) -> float:
        """Mean cosine over the batch between ``computed`` features and the server's."""
        ours = np.asarray(computed, dtype=np.float64).reshape(len(self.features), -1)
        theirs = np.asarray(self.features, dtype=np.float64).reshape(len(self.features), -1)
        norms = np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
        return float(np.mean((ours * theirs).sum(axis=1) / np.maximum(norms, 1e-12)))
