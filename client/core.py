"""Everything an edge client does, in plain Python: no Flower imports here.

A client keeps the backbone it was sent (by fingerprint, on disk), embeds each of its images once
(cached on disk by content), trains the head on those embeddings and scores it on its local test
share. Its images and embeddings never leave this module except as head weights and numbers.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from client.telemetry import device_metrics
from common import wire
from common.backbones import BackboneError, build_backbone, fingerprint, get_spec
from common.config import NodeConfig, RunConfig
from common.data import LabelledFiles, elpv_split, partition, scan_image_folder
from common.embedding import EmbeddingCache, EmbedStats, embed_files, progress_logger
from common.heads import Head, evaluate_head, head_arrays, load_head_arrays, make_head, train_head
from common.preprocess import PreprocessSpec

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
    head: str
    mlp_hidden: int
    num_classes: int
    local_epochs: int
    learning_rate: float
    weight_decay: float
    batch_size: int
    proximal_mu: float
    seed: int

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Instructions:
        try:
            return cls(
                server_round=int(record[wire.SERVER_ROUND]),
                fingerprint=str(record[wire.FINGERPRINT]),
                backbone_name=str(record[wire.BACKBONE_NAME]),
                preprocess=PreprocessSpec.from_json(str(record[wire.PREPROCESS])),
                head=str(record[wire.HEAD]),
                mlp_hidden=int(record[wire.MLP_HIDDEN]),
                num_classes=int(record[wire.NUM_CLASSES]),
                local_epochs=int(record[wire.LOCAL_EPOCHS]),
                learning_rate=float(record[wire.LEARNING_RATE]),
                weight_decay=float(record[wire.WEIGHT_DECAY]),
                batch_size=int(record[wire.BATCH_SIZE]),
                proximal_mu=float(record.get(wire.PROXIMAL_MU, 0.0)),
                seed=int(record[wire.SEED]),
            )
        except KeyError as missing:
            raise ValueError(
                f"Server instructions lack key {missing}; is the server the same edgesplit version?"
            ) from None


# --- the backbone, cached on disk by fingerprint ------------------------------------------------


class BackboneCache:
    """Backbones this device holds, one file per fingerprint, verified before use."""

    _lock = threading.RLock()  # re-entered: model() reads and verifies under the lock
    _verified: ClassVar[dict[Path, str]] = {}  # file -> fingerprint, per process
    _models: ClassVar[dict[str, nn.Module]] = {}  # one built model per fingerprint, per process

    def __init__(self, directory: Path) -> None:
        self.directory = directory / "backbones"

    def _path(self, fp: str) -> Path:
        return self.directory / f"{fp}.pt"

    def holds(self, fp: str) -> bool:
        """True if a verified copy of this fingerprint is on disk; a corrupt copy is deleted."""
        try:
            self._check(fp)
            return True
        except FingerprintMismatch as error:
            log.warning("%s; it will be downloaded again.", error)
            return False
        except FileNotFoundError:
            return False

    def store(self, name: str, state: dict[str, torch.Tensor], preprocess: PreprocessSpec, expected: str) -> None:
        """Keep a received backbone, refusing it if it does not hash to ``expected``."""
        actual = fingerprint(name, state, preprocess)
        if actual != expected:
            raise FingerprintMismatch(
                f"Received backbone hashes to {actual[:12]}, but the server announced {expected[:12]}. "
                "The transfer was corrupted or the server's registry changed; the round is refused."
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self._path(expected).with_suffix(f".tmp{os.getpid()}")
        torch.save({"name": name, "preprocess": preprocess.to_json(), "state": state}, temporary)
        temporary.replace(self._path(expected))  # atomic: a crash never leaves half a file
        with self._lock:
            self._verified[self._path(expected)] = expected

    def model(self, fp: str) -> nn.Module:
        """The frozen backbone for this fingerprint, built once per process. This device must
        hold a verified copy even when another simulated node already built the model."""
        with self._lock:
            if fp in self._models:
                self._check(fp)
                return self._models[fp]
            name, state = self._read(fp)
            self._models[fp] = build_backbone(name, state).to(memory_format=torch.channels_last)
            return self._models[fp]

    def _check(self, fp: str) -> None:
        """Verify this device's copy once per process (hashing 14 MB is not free)."""
        with self._lock:
            if self._verified.get(self._path(fp)) != fp:
                self._read(fp)

    def _read(self, fp: str) -> tuple[str, dict[str, torch.Tensor]]:
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
    _embedded: dict[str, EmbeddedData] = field(default_factory=dict)

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

    def receive_backbone(self, name: str, state: dict[str, torch.Tensor], instructions: Instructions) -> None:
        self.backbones.store(name, state, instructions.preprocess, instructions.fingerprint)

    def embedded(self, instructions: Instructions) -> EmbeddedData:
        """Embeddings of the local train and test files, computed at most once per image."""
        fp = instructions.fingerprint
        if fp not in self._embedded:
            if not self.backbones.holds(fp):
                raise FingerprintMismatch(f"{self.name} does not hold backbone {fp[:12]}; the server must send it.")
            log.info("%s: embedding local images with %d torch threads", self.name, torch.get_num_threads())
            train, test = self.data.train, self.data.test
            # One pass over both shares: one progress stream, one warning about bad images.
            files = LabelledFiles(train.paths + test.paths, train.labels + test.labels, train.class_names)
            cache = EmbeddingCache(self.cache_dir / "embeddings", fp)
            try:
                embedded = embed_files(
                    files,
                    lambda: self.backbones.model(fp),
                    instructions.preprocess,
                    cache,
                    self.config.embed_batch_size,
                    progress_logger(self.name),
                    who=self.name,
                )
            finally:
                cache.close()
            self._embedded[fp] = EmbeddedData(
                *embedded.rows(0, len(train)), *embedded.rows(len(train), len(files)), stats=embedded.stats
            )
        return self._embedded[fp]

    def train(
        self, arrays: Mapping[str, np.ndarray], instructions: Instructions
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Train the head from the global weights; returns (head arrays, metrics)."""
        data = self.embedded(instructions)
        if len(data.train_y) == 0:
            raise ValueError(f"{self.name} has no usable training images (all skipped).")
        head = self._head(arrays, instructions)
        result = train_head(
            head,
            data.train_x,
            data.train_y,
            epochs=instructions.local_epochs,
            learning_rate=instructions.learning_rate,
            batch_size=instructions.batch_size,
            weight_decay=instructions.weight_decay,
            proximal_mu=instructions.proximal_mu,
            seed=instructions.seed + 1000 * instructions.server_round + (self.node.partition_id or 0),
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
        return head_arrays(head.classifier), metrics

    def evaluate(self, arrays: Mapping[str, np.ndarray], instructions: Instructions) -> dict[str, float]:
        """Score the global head on this device's local test share."""
        data = self.embedded(instructions)
        head = self._head(arrays, instructions)
        report = evaluate_head(head, data.test_x, data.test_y, instructions.num_classes)
        return {
            wire.NUM_EXAMPLES: report.num_examples,
            wire.LOSS: report.loss if report.num_examples else 0.0,
            wire.ACCURACY: report.accuracy,
            wire.MACRO_F1: report.macro_f1,
            **self._embedding_metrics(data),
            **device_metrics(),
        }

    def _head(self, arrays: Mapping[str, np.ndarray], instructions: Instructions) -> Head:
        spec = get_spec(instructions.backbone_name)
        head = make_head(instructions.head, spec.feature_dim, instructions.num_classes, instructions.mlp_hidden)
        load_head_arrays(head.classifier, arrays)
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
