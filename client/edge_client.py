"""One edge device's work, in plain Python (no Flower imports): embed, train, evaluate,
personalise, FedNCM's class sums and Fed3R's ridge sums.

A device keeps the backbone it was sent (client/backbone_cache.py), embeds each of its images
once (cached on disk by content), trains the head on those embeddings and scores it on its local
test share. Its images and embeddings never leave this module except as head weights and numbers.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.backbone_cache import BackboneCache, BuiltEngines, VerifiedFiles
from client.golden import GoldenGate
from client.local_data import LocalData, load_local_data
from client.lru import LruCache
from client.privacy_floor import below_gram_floor, example_floor
from client.telemetry import device_metrics
from common import protocol
from common.balance import training_offsets
from common.config import NodeConfig, RunConfig
from common.cut import embedding_space
from common.data import DataError, LabelledFiles
from common.embedding import EmbeddingCache, EmbedStats, embed_files, progress_logger
from common.engines import EngineKind, FingerprintMismatch, engine_kind, resolve_engine
from common.fed3r import ridge_sums
from common.private_files import write_private
from common.protocol import BackboneStatus, ClassCounts, ClassStats, GoldenBatch, Instructions, ReplyStatus, RidgeStats
from common.trainable import Trainable, trainable_of

log = logging.getLogger(__name__)

# Embeddings a client keeps in memory: one per (space, views, training labels) it was asked for.
EMBEDDINGS_KEPT = 4


@dataclass
class EmbeddedData:
    """The local train and test shares as embeddings, and what embedding them cost."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    stats: EmbedStats

    def metrics(self) -> dict[str, float]:
        """The embedding's counts. Every reply that used this embedding carries the same ones, so
        that a replayed or repeated reply changes nothing (the server counts each node once)."""
        return {
            protocol.EMBED_SECONDS: self.stats.seconds,
            protocol.EMBEDDINGS_COMPUTED: self.stats.computed,
            protocol.EMBEDDINGS_CACHED: self.stats.cached,
            protocol.IMAGES_SKIPPED: self.stats.num_skipped,
        }


EmbeddingKey = tuple[str, tuple[str, ...], tuple[int, ...]]  # (space, views, training labels)


@dataclass
class EdgeClient:
    """One device: its config, data and (lazily) its embeddings.

    ``verified`` and ``engines`` are the process's backbone memory (client/state.py passes its
    own, shared by every node the process serves); a client made alone gets private ones.
    """

    config: RunConfig
    node: NodeConfig
    verified: VerifiedFiles = field(default_factory=lambda: LruCache(64))
    engines: BuiltEngines = field(default_factory=lambda: LruCache(4))
    _data: LocalData | None = None
    _embedded: LruCache[EmbeddingKey, EmbeddedData] = field(default_factory=lambda: LruCache(EMBEDDINGS_KEPT))
    _golden_cosines: dict[str, float] = field(default_factory=dict)  # variant -> its passed golden check

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
        return BackboneCache(self.cache_dir, self.verified, self.engines)

    @property
    def data(self) -> LocalData:
        if self._data is None:
            self._data = load_local_data(self.config, self.node)
            for note in self._data.notes:
                log.warning("%s: %s", self.name, note)
        return self._data

    def use_data(self, data: LocalData) -> None:
        """Work on these files from now on (embeddings of other labels stay cached)."""
        self._data = data

    @property
    def engine(self) -> EngineKind:
        """The backbone engine this device runs: its node config's, else the run's (``auto``
        resolves here, on the device, from what is installed)."""
        return resolve_engine(self.node.engine or self.config.engine)

    @property
    def golden_gate(self) -> GoldenGate:
        return GoldenGate(self.backbones, self.config.golden_min_cosine, self.config.num_threads, self.name)

    def backbone_status(self, fp: str, cut: int = 0) -> BackboneStatus:
        """The engine (after any golden-check fallback) and the variant held for it: the server's query."""
        return self.golden_gate.status(self.engine, fp, cut)

    def receive_backbone(
        self, arrays: Mapping[str, np.ndarray], instructions: Instructions, golden: GoldenBatch | None = None
    ) -> None:
        """Keep the variant the server sent (the backbone record's arrays) for the announced engine,
        and the golden batch it came with."""
        kind = engine_kind(instructions.engine)
        kind.require()  # e.g. the torch engine on a board without torch: say which extra to install
        self.backbones.keep(kind, arrays, instructions)
        if golden is not None:
            self.backbones.keep_golden(golden, instructions.fingerprint, instructions.cut)

    def reply_status(self, instructions: Instructions) -> ReplyStatus:
        """What this device says about itself with every train, evaluate and class-sums reply."""
        return ReplyStatus(
            fingerprint=instructions.fingerprint,
            engine=instructions.engine,
            engine_fingerprint=instructions.engine_fingerprint,
            data_notes="; ".join(self.data.notes),
            golden_cosine=self._golden_cosines.get(instructions.engine_fingerprint, -1.0),
            machine=platform.machine(),
        )

    def embedded(self, instructions: Instructions) -> EmbeddedData:
        """Embeddings at the cut of every view of the local train and test files, computed at
        most once per image and view."""
        if instructions.engine_fingerprint not in self._golden_cosines:  # before any embedding is used
            self._golden_cosines[instructions.engine_fingerprint] = self.golden_gate.check(instructions)
        space = embedding_space(instructions.engine_fingerprint, instructions.cut)
        key = (space, instructions.views, self.data.train.labels)
        return self._embedded.get_or_make(key, lambda: self._embed(instructions, space))

    def _embed(self, instructions: Instructions, space: str) -> EmbeddedData:
        kind, fp, variant = engine_kind(instructions.engine), instructions.fingerprint, instructions.engine_fingerprint
        cut, views = instructions.cut, instructions.views
        kind.require()
        if not self.backbones.holds(kind, fp, variant, cut):
            raise FingerprintMismatch(
                f"{self.name} does not hold the {kind.name} backbone {variant[:12]}; the server must send it."
            )
        log.info("%s: embedding local images in %d view(s) with the %s engine", self.name, len(views), kind.name)
        train, test = self.data.train, self.data.test
        # One pass over both shares: one progress stream, one warning about bad images.
        # (Both shares carry the folder's skipped files: count them once.)
        files = LabelledFiles(
            train.paths + test.paths, train.labels + test.labels, train.class_names, skipped=train.skipped
        )
        cache = EmbeddingCache(self.cache_dir / "embeddings", space)
        try:
            embedded = embed_files(
                files,
                lambda: self.backbones.engine(kind, fp, variant, self.config.num_threads, cut),
                instructions.preprocess,
                cache,
                self.config.embed_batch_size,
                progress_logger(self.name),
                who=self.name,
                views=views,
            )
        finally:
            cache.close()
        return EmbeddedData(*embedded.rows(0, len(train)), *embedded.rows(len(train), len(files)), stats=embedded.stats)

    def train(
        self, arrays: Mapping[str, np.ndarray], instructions: Instructions
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Train the trainable part (the head, and the tail at a later cut) from the global
        weights; returns (its arrays, metrics)."""
        head = self._head(arrays, instructions)  # first: a cut this device cannot train fails before embedding
        data = self.embedded(instructions)
        if len(data.train_y) == 0:
            raise DataError(
                f"{self.name} has no usable training images (all skipped): see its data notes, and fix or "
                "replace the images in its data folder."
            )
        local_counts = np.bincount(data.train_y, minlength=instructions.num_classes)
        class_weights, logit_offsets = training_offsets(
            instructions.class_balance,
            instructions.class_prior,
            instructions.logit_adjust_tau,
            local_counts if instructions.local_prior_correction else None,
        )
        result = head.train(
            data.train_x,
            data.train_y,
            epochs=instructions.local_epochs,
            learning_rate=instructions.learning_rate,
            batch_size=instructions.batch_size,
            weight_decay=instructions.weight_decay,
            proximal_mu=instructions.proximal_mu,
            seed=self._seed(instructions),
            class_weights=class_weights,
            logit_offsets=logit_offsets,
        )
        present = set(self.data.train.labels + self.data.test.labels)
        metrics = {
            protocol.NUM_EXAMPLES: result.num_examples,
            protocol.TRAIN_LOSS: result.loss,
            protocol.TRAIN_ACCURACY: result.accuracy,
            protocol.TRAIN_SECONDS: result.seconds,
            protocol.CLASSES_MISSING: instructions.num_classes - len(present),
            **data.metrics(),
            **device_metrics(),
        }
        return head.arrays(), metrics

    def evaluate(self, arrays: Mapping[str, np.ndarray], instructions: Instructions) -> dict[str, float]:
        """Score the global head on this device's local test share; with ``personal-epochs``,
        also a personal head fine-tuned from it on the local training share."""
        head = self._head(arrays, instructions)
        data = self.embedded(instructions)
        classes, average = instructions.num_classes, instructions.average_views
        report = head.evaluate(data.test_x, data.test_y, classes, average)
        metrics = {
            protocol.NUM_EXAMPLES: report.num_examples,
            protocol.LOSS: report.loss if report.num_examples else 0.0,
            protocol.ACCURACY: report.accuracy,
            protocol.MACRO_F1: report.macro_f1,
        }
        if instructions.personal_epochs > 0 and len(data.train_y):
            personal = self.personalise(head, data, instructions)
            personal_report = personal.evaluate(data.test_x, data.test_y, classes, average)
            metrics[protocol.PERSONAL_ACCURACY] = personal_report.accuracy
            metrics[protocol.PERSONAL_MACRO_F1] = personal_report.macro_f1
        return {**metrics, **data.metrics(), **device_metrics()}

    def personalise(self, global_head: Trainable, data: EmbeddedData, instructions: Instructions) -> Trainable:
        """A personal head: the global model with its classifier fine-tuned on this device's own
        training share (the tail, the shared representation, stays global: FedRep/FedBABU). It is
        kept on disk, so the board can classify with it, and never sent.

        The step is a tenth of ``learning-rate``: it adjusts a trained head to local data rather
        than retraining it, and a few local images at the full rate overshoot (on a
        2-classes-per-client split, the full rate left personal heads below the global one)."""
        head = global_head.copy()
        head.train(
            data.train_x,
            data.train_y,
            epochs=instructions.personal_epochs,
            learning_rate=instructions.learning_rate / 10,
            batch_size=instructions.batch_size,
            weight_decay=instructions.weight_decay,
            seed=self._seed(instructions) + 1,
            train=lambda name: name.startswith("classifier."),
        )
        path = self.cache_dir / "personal" / f"{instructions.fingerprint[:16]}-cut{instructions.cut}.npz"
        write_private(path, lambda target: _save_arrays(target, head.arrays()))
        return head

    def class_sums(
        self, arrays: Mapping[str, np.ndarray], instructions: Instructions
    ) -> tuple[ClassStats, dict[str, float]]:
        """FedNCM's statistics of the local training share: per class, the sum of the features
        the classifier sees and the count. A class with fewer images than the floor (the
        server's ``ncm-min-examples``, never below this board's own ``min-examples``) is sent
        as zeros, so that no sum is close to one image's features."""
        head = self._head(arrays, instructions)
        data = self.embedded(instructions)
        minimum = example_floor(instructions.ncm_min_examples, self.node.min_examples)
        sums, counts = head.class_sums(data.train_x, data.train_y, instructions.num_classes, minimum)
        metrics = {protocol.NUM_EXAMPLES: len(data.train_y), **data.metrics(), **device_metrics()}
        return ClassStats(sums=sums, counts=counts), metrics

    def ridge_sums(
        self, arrays: Mapping[str, np.ndarray], instructions: Instructions, min_examples: int, min_gram: int
    ) -> tuple[RidgeStats, dict[str, float]]:
        """Fed3R's statistics of the local training share (common/fed3r.py): the Gram matrix and class
        sums of what the last layer sees, and the counts; a class below ``min_examples`` left out, and
        refused (``Refusal``) below ``min_gram`` images in all, before embedding where labels tell."""
        if len(self.data.train.labels) < min_gram:
            raise below_gram_floor(self.name, len(self.data.train.labels), min_gram)
        head = self._head(arrays, instructions)
        data = self.embedded(instructions)
        stats = ridge_sums(head.last_inputs, data.train_x, data.train_y, instructions.num_classes, min_examples)
        if (total := int(stats.counts.sum())) < min_gram:
            raise below_gram_floor(self.name, total, min_gram)
        return stats, {protocol.NUM_EXAMPLES: total, **data.metrics(), **device_metrics()}

    def class_counts(self, instructions: Instructions) -> tuple[ClassCounts, dict[str, float]]:
        """How many training images of each class this device holds (labels only: nothing is
        embedded), for the class prior of class-balanced training."""
        counts = np.bincount(np.asarray(self.data.train.labels, dtype=np.int64), minlength=instructions.num_classes)
        metrics = {protocol.NUM_EXAMPLES: int(counts.sum()), **device_metrics()}
        return ClassCounts(counts=counts.astype(np.float32)), metrics

    def _seed(self, instructions: Instructions) -> int:
        return instructions.seed + 1000 * instructions.server_round + (self.node.partition_id or 0)

    @staticmethod
    def _head(arrays: Mapping[str, np.ndarray], instructions: Instructions) -> Trainable:
        head = trainable_of(instructions)
        head.load(arrays)
        return head


def _save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with path.open("wb") as handle:  # a handle: given a path, NumPy would add ".npz" to the temporary's name
        np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds oddly
