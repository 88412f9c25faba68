"""Everything an edge client does, in plain Python: no Flower imports here.

A client keeps the backbone it was sent (by fingerprint, on disk), embeds each of its images once
(cached on disk by content), trains the head on those embeddings and scores it on its local test
share. Its images and embeddings never leave this module except as head weights and numbers.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from client.faults import before_work, fault_of, flip_labels, poison
from client.telemetry import device_metrics
from common import wire
from common.backbones import BackboneError, build_backbone, fingerprint
from common.config import NodeConfig, RunConfig
from common.data import LabelledFiles, elpv_split, partition, scan_image_folder
from common.embedding import EmbeddingCache, EmbedStats, embed_files, progress_logger
from common.engines import Engine, OnnxEngine, TorchEngine, resolve_engine, variant_fingerprint
from common.heads import Head, class_sums, evaluate_head, head_arrays, load_head_arrays, train_head
from common.preprocess import PreprocessSpec
from common.split import build_head, embedding_space, split_backbone
from common.views import parse_views

log = logging.getLogger(__name__)


class FingerprintMismatch(BackboneError):
    """Backbone weights do not hash to the fingerprint they were announced with."""


# --- instructions from the server ---------------------------------------------------------------


@dataclass(frozen=True)
class Instructions:
    """What the server asks of one round (the message's ConfigRecord), typed."""

    server_round: int
    fingerprint: str
    backbone_name: str
    preprocess: PreprocessSpec
    engine: str
    engine_fingerprint: str
    head: str
    mlp_hidden: int
    cut: int
    views: tuple[str, ...]
    average_views: bool
    num_classes: int
    local_epochs: int
    learning_rate: float
    weight_decay: float
    batch_size: int
    proximal_mu: float
    seed: int
    personal_epochs: int
    ncm_min_examples: int

    def new_head(self) -> Head:
        """The trainable part these instructions describe, its values still to be loaded."""
        return build_head(self.backbone_name, self.cut, self.head, self.num_classes, self.mlp_hidden)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Instructions:
        try:
            return cls(
                server_round=int(record[wire.SERVER_ROUND]),
                fingerprint=str(record[wire.FINGERPRINT]),
                backbone_name=str(record[wire.BACKBONE_NAME]),
                preprocess=PreprocessSpec.from_json(str(record[wire.PREPROCESS])),
                engine=str(record[wire.ENGINE]),
                engine_fingerprint=str(record[wire.ENGINE_FINGERPRINT]),
                head=str(record[wire.HEAD]),
                mlp_hidden=int(record[wire.MLP_HIDDEN]),
                cut=int(record[wire.CUT]),
                views=parse_views(str(record[wire.VIEWS])),
                average_views=bool(record[wire.AVERAGE_VIEWS]),
                num_classes=int(record[wire.NUM_CLASSES]),
                local_epochs=int(record[wire.LOCAL_EPOCHS]),
                learning_rate=float(record[wire.LEARNING_RATE]),
                weight_decay=float(record[wire.WEIGHT_DECAY]),
                batch_size=int(record[wire.BATCH_SIZE]),
                proximal_mu=float(record.get(wire.PROXIMAL_MU, 0.0)),
                seed=int(record[wire.SEED]),
                personal_epochs=int(record[wire.PERSONAL_EPOCHS]),
                ncm_min_examples=int(record[wire.NCM_MIN_EXAMPLES]),
            )
        except KeyError as missing:
            raise ValueError(
                f"Server instructions lack key {missing}; is the server the same edgesplit version?"
            ) from None


# --- the backbone, cached on disk by fingerprint ------------------------------------------------


class BackboneCache:
    """Backbone variants this device holds, one file each, verified before use.

    The torch variant is the weights (``<fingerprint>.pt``, whatever the cut: the device builds
    the prefix from them), checked by recomputing the backbone fingerprint; an ONNX engine's
    variant is its model of the backbone up to the cut (``<fingerprint>.<engine>[.cut<k>].onnx``),
    checked by recomputing the variant fingerprint from its bytes. A copy that fails the check
    is not held (a torch file is deleted, an ONNX file replaced), so the server sends it again.
    """

    _lock = threading.RLock()  # re-entered: engine() reads and verifies under the lock
    _verified: ClassVar[dict[Path, str]] = {}  # file -> variant fingerprint, per process
    _engines: ClassVar[dict[tuple[str, int], Engine]] = {}  # one built engine per variant and cut, per process

    def __init__(self, directory: Path) -> None:
        self.directory = directory / "backbones"

    def _path(self, fp: str, engine: str = "torch", cut: int = 0) -> Path:
        if engine == "torch":
            return self.directory / f"{fp}.pt"
        return self.directory / (f"{fp}.{engine}.onnx" if cut == 0 else f"{fp}.{engine}.cut{cut}.onnx")

    def held(self, fp: str, engine: str = "torch", cut: int = 0) -> str | None:
        """The variant fingerprint of this engine's verified copy of backbone ``fp``, if any."""
        try:
            return self._check(fp, engine, cut)
        except FingerprintMismatch as error:
            log.warning("%s; it will be downloaded again.", error)
            return None
        except FileNotFoundError:
            return None

    def holds(self, fp: str, engine: str = "torch", variant: str | None = None, cut: int = 0) -> bool:
        """True if a verified copy of the variant (default: the torch weights) is on disk."""
        return self.held(fp, engine, cut) == (variant or fp)

    def store(self, name: str, state: dict[str, torch.Tensor], preprocess: PreprocessSpec, expected: str) -> None:
        """Keep received torch weights, refusing them if they do not hash to ``expected``."""
        actual = fingerprint(name, state, preprocess)
        if actual != expected:
            raise FingerprintMismatch(
                f"Received backbone hashes to {actual[:12]}, but the server announced {expected[:12]}. "
                "The transfer was corrupted or the server's registry changed; the round is refused."
            )
        self._write(
            self._path(expected),
            expected,
            lambda path: torch.save({"name": name, "preprocess": preprocess.to_json(), "state": state}, path),
        )

    def store_onnx(self, fp: str, engine: str, model: bytes, expected: str, cut: int = 0) -> None:
        """Keep a received ONNX variant, refusing it if it does not hash to ``expected``."""
        actual = variant_fingerprint(fp, engine, model)
        if actual != expected:
            raise FingerprintMismatch(
                f"Received {engine} backbone hashes to {actual[:12]}, but the server announced {expected[:12]}. "
                "The transfer was corrupted; the round is refused."
            )
        self._write(self._path(fp, engine, cut), expected, lambda path: path.write_bytes(model))

    def _write(self, path: Path, variant: str, write: Callable[[Path], object]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        write(temporary)
        temporary.replace(path)  # atomic: a crash never leaves half a file
        with self._lock:
            self._verified[path] = variant

    def engine(self, fp: str, engine: str, variant: str, num_threads: int = 0, cut: int = 0) -> Engine:
        """The runnable backbone up to the cut for this variant, built once per process. This
        device must hold a verified copy even when another simulated node already built it."""
        with self._lock:
            key = (variant, cut)
            if engine == "torch" and variant == fp and key not in self._engines:
                # One read both verifies the weights and gives them to build from (not two hashes).
                name, state = self._read_torch(fp)
                prefix, _ = split_backbone(name, build_backbone(name, state), cut)
                self._engines[key] = TorchEngine(prefix)
            if self._check(fp, engine, cut) != variant:
                raise FingerprintMismatch(
                    f"This device holds no {engine} backbone {variant[:12]}; the server must send it."
                )
            if key not in self._engines:
                self._engines[key] = OnnxEngine(self._path(fp, engine, cut), num_threads)
            return self._engines[key]

    def _check(self, fp: str, engine: str, cut: int = 0) -> str:
        """Verify this device's copy once per process (hashing megabytes is not free)."""
        with self._lock:
            path = self._path(fp, engine, cut)
            if path not in self._verified:
                if engine == "torch":
                    self._read_torch(fp)
                else:
                    self._read_onnx(path, fp, engine)
            return self._verified[path]

    def _read_torch(self, fp: str) -> tuple[str, dict[str, torch.Tensor]]:
        """Load and verify; a copy that is unreadable or hashes differently is deleted."""
        path = self._path(fp)
        if not path.is_file():
            raise FileNotFoundError(path)
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            name, state = stored["name"], stored["state"]
            matches = fingerprint(name, state, PreprocessSpec.from_json(stored["preprocess"])) == fp
        except Exception as error:  # truncated or foreign file: treat as not held
            path.unlink(missing_ok=True)
            raise FingerprintMismatch(f"Cached backbone {path} is unreadable ({error}) and was removed") from error
        if not matches:
            path.unlink(missing_ok=True)
            raise FingerprintMismatch(
                f"Cached backbone {path} does not match its fingerprint {fp[:12]} and was removed"
            )
        with self._lock:
            self._verified[path] = fp
        return name, state

    def _read_onnx(self, path: Path, fp: str, engine: str) -> None:
        """An ONNX variant is whatever its bytes hash to; the caller compares with what it needs."""
        if not path.is_file():
            raise FileNotFoundError(path)
        with self._lock:
            self._verified[path] = variant_fingerprint(fp, engine, path.read_bytes())


# --- local data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalData:
    train: LabelledFiles
    test: LabelledFiles
    notes: tuple[str, ...] = ()


def local_split(files: LabelledFiles, test_fraction: float, seed: int) -> tuple[LabelledFiles, LabelledFiles]:
    """Seeded local train/test split that always keeps at least one training example."""
    order = np.random.default_rng(seed).permutation(len(files))
    num_test = min(int(len(files) * test_fraction), len(files) - 1)
    return files.subset(np.sort(order[num_test:])), files.subset(np.sort(order[:num_test]))


def load_local_data(config: RunConfig, node: NodeConfig) -> LocalData:
    """This node's private files: an ELPV partition in simulation, or its own ImageFolder."""
    node_seed = config.seed + 7919 * (node.partition_id or 0)
    if node.data_dir or config.dataset == "folder":
        folder = node.data_dir or _simulated_folder(config, node)
        files = scan_image_folder(folder, config.classes())
    else:
        if node.partition_id is None or node.num_partitions is None:
            raise ValueError(
                "dataset='elpv' splits ELPV over simulated clients and needs node-config "
                "'partition-id' and 'num-partitions'. On a real device set node-config 'data-dir'."
            )
        client_share, _ = elpv_split(config.elpv_task, config.subset, config.test_fraction, config.seed)
        files = partition(
            client_share,
            node.num_partitions,
            node.partition_id,
            config.partitioner,
            config.seed,
            config.dirichlet_alpha,
            config.classes_per_client,
        )
    train, test = local_split(files, config.client_test_fraction, node_seed)
    return LocalData(train, test, files.notes)


def _simulated_folder(config: RunConfig, node: NodeConfig) -> Path:
    if not config.data_dir or node.partition_id is None:
        raise ValueError(
            "dataset='folder' needs node-config 'data-dir' on each device, or run-config 'data-dir' "
            "holding client-<partition-id>/ folders in simulation."
        )
    return Path(config.data_dir).expanduser() / f"client-{node.partition_id}"


# --- the client -----------------------------------------------------------------------------------


@dataclass
class EmbeddedData:
    """The local train and test shares as embeddings, and what embedding them cost."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    stats: EmbedStats
    reported: bool = False  # embedding counts go into one reply only


@dataclass
class EdgeClient:
    """One device: its config, data, caches and (lazily) its embeddings."""

    config: RunConfig
    node: NodeConfig
    _data: LocalData | None = None
    _embedded: dict[tuple[str, tuple[str, ...]], EmbeddedData] = field(default_factory=dict)  # (space, views) ->

    @property
    def name(self) -> str:
        return f"client {self.node.partition_id}" if self.node.partition_id is not None else "client"

    @property
    def cache_dir(self) -> Path:
        if self.node.cache_dir:
            return Path(self.node.cache_dir).expanduser()
        suffix = f"node-{self.node.partition_id}" if self.node.partition_id is not None else "node"
        return self.config.resolved_cache_dir() / suffix

    @property
    def backbones(self) -> BackboneCache:
        return BackboneCache(self.cache_dir)

    @property
    def data(self) -> LocalData:
        if self._data is None:
            self._data = load_local_data(self.config, self.node)
            for note in self._data.notes:
                log.warning("%s: %s", self.name, note)
        return self._data

    @property
    def engine(self) -> str:
        """The backbone engine this device runs: its node config's, else the run's (``auto``
        resolves here, on the device, from what is installed)."""
        return resolve_engine(self.node.engine or self.config.engine)

    def backbone_status(self, fp: str, cut: int = 0) -> tuple[str, str]:
        """(engine, the variant fingerprint held for it or ""): the answer to the server's query."""
        engine = self.engine
        return engine, self.backbones.held(fp, engine, cut) or ""

    def receive_backbone(self, artifact: dict[str, torch.Tensor] | bytes, instructions: Instructions) -> None:
        """Keep the variant the server sent: torch weights, or an ONNX engine's model bytes."""
        if isinstance(artifact, bytes):
            self.backbones.store_onnx(
                instructions.fingerprint,
                instructions.engine,
                artifact,
                instructions.engine_fingerprint,
                instructions.cut,
            )
        else:
            self.backbones.store(
                instructions.backbone_name, artifact, instructions.preprocess, instructions.fingerprint
            )

    def embedded(self, instructions: Instructions) -> EmbeddedData:
        """Embeddings at the cut of every view of the local train and test files, computed at
        most once per image and view."""
        fp, engine, variant = instructions.fingerprint, instructions.engine, instructions.engine_fingerprint
        cut, views = instructions.cut, instructions.views
        key = (embedding_space(variant, cut), views)
        if key not in self._embedded:
            if not self.backbones.holds(fp, engine, variant, cut):
                raise FingerprintMismatch(
                    f"{self.name} does not hold the {engine} backbone {variant[:12]}; the server must send it."
                )
            log.info("%s: embedding local images in %d view(s) with the %s engine", self.name, len(views), engine)
            train, test = self.data.train, self.data.test
            # One pass over both shares: one progress stream, one warning about bad images.
            # (Both shares carry the folder's skipped files: count them once.)
            files = LabelledFiles(
                train.paths + test.paths, train.labels + test.labels, train.class_names, skipped=train.skipped
            )
            cache = EmbeddingCache(self.cache_dir / "embeddings", key[0])
            try:
                embedded = embed_files(
                    files,
                    lambda: self.backbones.engine(fp, engine, variant, self.config.num_threads, cut),
                    instructions.preprocess,
                    cache,
                    self.config.embed_batch_size,
                    progress_logger(self.name),
                    who=self.name,
                    views=views,
                )
            finally:
                cache.close()
            self._embedded[key] = EmbeddedData(
                *embedded.rows(0, len(train)), *embedded.rows(len(train), len(files)), stats=embedded.stats
            )
        return self._embedded[key]

    def train(
        self, arrays: Mapping[str, np.ndarray], instructions: Instructions
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Train the trainable part (the head, and the tail at a later cut) from the global
        weights; returns (its arrays, metrics)."""
        fault = fault_of(self.config, self.node.partition_id, instructions.server_round)
        before_work(fault, self.config)
        data = self.embedded(instructions)
        if len(data.train_y) == 0:
            raise ValueError(f"{self.name} has no usable training images (all skipped).")
        head = self._head(arrays, instructions)
        result = train_head(
            head,
            data.train_x,
            flip_labels(fault, data.train_y, instructions.num_classes),
            epochs=instructions.local_epochs,
            learning_rate=instructions.learning_rate,
            batch_size=instructions.batch_size,
            weight_decay=instructions.weight_decay,
            proximal_mu=instructions.proximal_mu,
            seed=self._seed(instructions),
        )
        metrics = {
            wire.NUM_EXAMPLES: result.num_examples,
            wire.TRAIN_LOSS: result.loss,
            wire.TRAIN_ACCURACY: result.accuracy,
            wire.TRAIN_SECONDS: result.seconds,
            wire.CLASSES_MISSING: instructions.num_classes - len(set(self.data.train.labels + self.data.test.labels)),
            **self._embedding_metrics(data),
            **device_metrics(),
        }
        return poison(fault, head_arrays(head), arrays), metrics

    def evaluate(self, arrays: Mapping[str, np.ndarray], instructions: Instructions) -> dict[str, float]:
        """Score the global head on this device's local test share; with ``personal-epochs``,
        also a personal head fine-tuned from it on the local training share."""
        before_work(fault_of(self.config, self.node.partition_id, instructions.server_round), self.config)
        data = self.embedded(instructions)
        head = self._head(arrays, instructions)
        classes, average = instructions.num_classes, instructions.average_views
        report = evaluate_head(head, data.test_x, data.test_y, classes, average)
        metrics = {
            wire.NUM_EXAMPLES: report.num_examples,
            wire.LOSS: report.loss if report.num_examples else 0.0,
            wire.ACCURACY: report.accuracy,
            wire.MACRO_F1: report.macro_f1,
        }
        if instructions.personal_epochs > 0 and len(data.train_y):
            personal = self.personalise(head, data, instructions)
            personal_report = evaluate_head(personal, data.test_x, data.test_y, classes, average)
            metrics[wire.PERSONAL_ACCURACY] = personal_report.accuracy
            metrics[wire.PERSONAL_MACRO_F1] = personal_report.macro_f1
        return {**metrics, **self._embedding_metrics(data), **device_metrics()}

    def personalise(self, global_head: Head, data: EmbeddedData, instructions: Instructions) -> Head:
        """A personal head: the global model with its classifier fine-tuned on this device's own
        training share (the tail, the shared representation, stays global: FedRep/FedBABU). It is
        kept on disk, so the board can classify with it, and never sent.

        The step is a tenth of ``learning-rate``: it adjusts a trained head to local data rather
        than retraining it, and a few local images at the full rate overshoot (on a
        2-classes-per-client split, the full rate left personal heads below the global one)."""
        head = copy.deepcopy(global_head)
        train_head(
            head,
            data.train_x,
            data.train_y,
            epochs=instructions.personal_epochs,
            learning_rate=instructions.learning_rate / 10,
            batch_size=instructions.batch_size,
            weight_decay=instructions.weight_decay,
            seed=self._seed(instructions) + 1,
            train=lambda name: name.startswith("classifier."),
        )
        directory = self.cache_dir / "personal"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{instructions.fingerprint[:16]}-cut{instructions.cut}.npz"
        np.savez(path, **head_arrays(head))  # type: ignore[arg-type]  # numpy's stub types **kwds oddly
        return head

    def class_sums(
        self, arrays: Mapping[str, np.ndarray], instructions: Instructions
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """FedNCM's statistics of the local training share: per class, the sum of the features
        the classifier sees and the count. A class with fewer than ``ncm-min-examples`` images
        is sent as zeros, so that no sum is close to one image's features."""
        data = self.embedded(instructions)
        head = self._head(arrays, instructions)
        minimum = instructions.ncm_min_examples
        sums, counts = class_sums(head, data.train_x, data.train_y, instructions.num_classes, minimum)
        metrics = {wire.NUM_EXAMPLES: len(data.train_y), **self._embedding_metrics(data), **device_metrics()}
        return {wire.CLASS_SUMS: sums, wire.CLASS_COUNTS: counts}, metrics

    def _seed(self, instructions: Instructions) -> int:
        return instructions.seed + 1000 * instructions.server_round + (self.node.partition_id or 0)

    def _head(self, arrays: Mapping[str, np.ndarray], instructions: Instructions) -> Head:
        head = instructions.new_head()
        load_head_arrays(head, arrays)
        return head

    @staticmethod
    def _embedding_metrics(data: EmbeddedData) -> dict[str, float]:
        first, stats = not data.reported, data.stats
        data.reported = True
        return {
            wire.EMBED_SECONDS: stats.seconds if first else 0.0,
            wire.EMBEDDINGS_COMPUTED: stats.computed if first else 0,
            wire.EMBEDDINGS_CACHED: stats.cached if first else 0,
            wire.IMAGES_SKIPPED: stats.num_skipped if first else 0,
        }
