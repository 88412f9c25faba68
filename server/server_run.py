"""One federated run from the server's side, in plain Python: the backbone and its variants,
the held-out test embedding, the instructions nodes get, central evaluation and the records of
each round. No Flower imports: ``server/edgesplit_strategy.py`` and its collaborators translate between
Flower messages and the calls here; ``server/outcome.py`` writes what a finished run leaves.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.backbones import (
    BackboneSpec,
    build_backbone,
    fingerprint,
    get_spec,
    load_backbone_weights,
    preprocess_for,
)
from common.balance import class_prior
from common.config import RunConfig
from common.cut import embedding_space
from common.data import DataError, LabelledFiles, elpv_split, scan_image_folder
from common.embedding import Embedded, EmbeddingCache, embed_files, progress_logger
from common.engines import EngineKind, resolve_engine
from common.export import calibration_images
from common.heads import Head, load_head_arrays
from common.kinds import DatasetKind, EventKind, HeadKind, StrategyName
from common.metrics import ClassificationReport
from common.preprocess import PreprocessSpec
from common.protocol import ClassCounts, ClassStats, Instructions, Phase, RidgeStats
from common.split import build_head
from common.trainable import Trainable, last_layer_dim, make_trainable, trainable_shapes
from server.checkpoint import Checkpoint, CheckpointError
from server.ledger import EmbeddingLedger, RoundRecord, human_bytes
from server.run_folder import RunLog, new_run_id
from server.variants import BackboneVariants

log = logging.getLogger(__name__)


@dataclass
class ServerRun:
    """One federated run, from the server's point of view."""

    config: RunConfig
    spec: BackboneSpec
    backbone_state: dict[str, torch.Tensor]
    preprocess: PreprocessSpec
    fingerprint: str
    classes: tuple[str, ...]
    run_log: RunLog
    test: Embedded
    variants: BackboneVariants
    engine: EngineKind  # what the server embeds its own held-out images with
    started: float = field(default_factory=time.perf_counter)
    rounds: list[RoundRecord] = field(default_factory=list)
    embedding: EmbeddingLedger = field(default_factory=EmbeddingLedger)
    nodes: dict[int, dict[str, Any]] = field(default_factory=dict)  # node -> engine and golden check
    final_report: ClassificationReport | None = None
    checkpoint: Checkpoint | None = None  # what a resumed run continues from
    initialisation: dict[str, Any] = field(default_factory=dict)  # how the head was initialised (FedNCM, Fed3R, LDA)
    class_counts: tuple[int, ...] = ()  # the federation's, from the one-shot statistics: the class prior
    # DP runs: the noise multiplier of every release so far, earlier processes' included (server/dp.py)
    dp_releases: list[float] = field(default_factory=list)
    _initial_head: dict[str, np.ndarray] | None = None

    @property
    def start_round(self) -> int:
        """The last round completed before this process started (0 for a new run)."""
        return self.checkpoint.round if self.checkpoint else 0

    @property
    def start_head(self) -> dict[str, np.ndarray]:
        return dict(self.checkpoint.head) if self.checkpoint else self.initial_head()

    @classmethod
    def prepare(cls, config: RunConfig, flower_run_id: int | None = None) -> ServerRun:
        """Build the backbone, fingerprint it, open the run folder, embed the held-out test split."""
        started = time.perf_counter()
        spec = get_spec(config.backbone)
        preprocess = preprocess_for(config.backbone, config.image_size, config.crop_pct)
        state = load_backbone_weights(config.backbone, config.backbone_weights or None)
        fp = fingerprint(spec.name, state, preprocess)
        classes = config.classes()
        checkpoint, run_log = _open_run_folder(config, fp, classes, flower_run_id)
        run_log.write_config(
            {
                "run_config": config.to_flower(),
                "classes": list(classes),
                "backbone": {"name": spec.name, "fingerprint": fp, "feature_dim": spec.feature_dim},
                "preprocess": asdict(preprocess),
                "flower_run_id": flower_run_id,
            }
        )
        log.info("Run folder: %s", run_log.run_dir)
        log.info("Backbone %s, fingerprint %s", spec.name, fp[:16])
        test_files = server_test_files(config)
        variants = backbone_variants(config, spec.name, state, preprocess, fp, test_files)
        # The server embeds with the run's engine, as a client on this platform would, so its
        # evaluation sees the features the clients train on.
        engine = resolve_engine(config.engine)
        golden_cosine = check_server_engine(variants, engine, config.num_threads, config.golden_min_cosine)
        test = embed_held_out(config, variants, engine, preprocess, test_files)
        run = cls(config, spec, state, preprocess, fp, classes, run_log, test, variants, engine, started=started)
        run.embedding = EmbeddingLedger(test.stats.computed, test.stats.cached, test.stats.num_skipped)
        if checkpoint is not None:
            run.resume_from(checkpoint)
        run_log.event(
            EventKind.RUN_RESUMED if checkpoint else EventKind.RUN_START,
            **({"from_round": checkpoint.round} if checkpoint else {}),
            backbone=spec.name,
            fingerprint=fp,
            engine=engine.name,
            golden_cosine=golden_cosine,
            test_examples=len(test.labels),
            test_class_counts=np.bincount(test.labels, minlength=len(classes)).tolist(),
            embeddings_computed=test.stats.computed,
            embeddings_cached=test.stats.cached,
        )
        return run

    def resume_from(self, checkpoint: Checkpoint) -> None:
        """Go on after the checkpointed round: its rounds so far, and the embedding work of the
        run's earlier processes (skipped images are a property of the data, and every client
        reports its own again after the restart)."""
        self.checkpoint = checkpoint
        self.rounds = [RoundRecord(**record) for record in checkpoint.rounds]
        if self.config.dp and any(r.dp_noise_multiplier <= 0 for r in self.rounds):
            raise CheckpointError(
                "This run asks for differential privacy (dp-clipping-norm > 0), but the checkpointed run released "
                "heads without noise: no budget covers them. Start a new run without 'resume-from'."
            )
        if self.config.dp:
            self.dp_releases = checkpoint.dp_releases_so_far(self.run_log.run_dir)
        self.class_counts = tuple(int(c) for c in checkpoint.totals.get("class_counts", ()))
        self.embedding.base_computed += checkpoint.totals.get("embedding_computed", 0)
        self.embedding.base_cached += checkpoint.totals.get("embedding_cached", 0)
        if self.rounds:
            self.final_report = self.evaluate(checkpoint.head)

    # --- what goes to clients ------------------------------------------------------------------

    def instructions(self, server_round: int, phase: Phase = Phase.TRAIN) -> Instructions:
        """What every node is told this round (its engine and variant are filled in per node).
        Training follows the learning-rate schedule; evaluation and FedNCM's query carry the
        base rate (personal heads fine-tune at a tenth of it)."""
        config = self.config
        rate = config.learning_rate_at(server_round) if phase is Phase.TRAIN else config.learning_rate
        return Instructions.from_run_config(
            config,
            server_round=server_round,
            fingerprint=self.fingerprint,
            backbone_name=self.spec.name,
            preprocess=self.preprocess,
            engine=self.engine.name,
            engine_fingerprint=self.variants.variant_fingerprint(self.engine),
            views=config.view_names(),
            num_classes=len(self.classes),
            learning_rate=rate,
            proximal_mu=config.proximal_mu if config.strategy == StrategyName.FEDPROX else 0.0,
            class_prior=self.class_prior(),
        )

    def class_prior(self) -> tuple[float, ...]:
        """The federation's class shares, from the one-shot statistics' counts (() before them)."""
        return tuple(float(p) for p in class_prior(np.asarray(self.class_counts))) if self.class_counts else ()

    def class_stats_shapes(self) -> dict[str, tuple[int, ...]]:
        return ClassStats.shapes(len(self.classes), self.spec.feature_dim)

    def ridge_stats_shapes(self) -> dict[str, tuple[int, ...]]:
        """Fed3R's statistics of what the last layer sees: the features, or the MLP's hidden units."""
        dim = last_layer_dim(self.spec.name, self.config.head, self.config.mlp_hidden)
        return RidgeStats.shapes(len(self.classes), dim)

    def statistics_shapes(self, phase: Phase) -> dict[str, tuple[int, ...]]:
        """The arrays of a one-shot query's statistics, by name."""
        if phase == Phase.CLASS_SUMS:
            return self.class_stats_shapes()
        if phase == Phase.RIDGE_SUMS:
            return self.ridge_stats_shapes()
        return ClassCounts.shapes(len(self.classes))

    def ridge_feature_bound(self) -> float:
        """The largest squared norm a z of Fed3R's sums can have: the head's input features have
        squared norm ``feature_dim`` exactly (PowerNorm), and the MLP's first layer, the run's own
        initial one, stretches them by at most its largest singular value (plus its bias)."""
        dim = float(self.spec.feature_dim)
        if self.config.head == HeadKind.LINEAR:
            return dim
        head = self.initial_head()
        weight, bias = head["classifier.0.weight"].astype(np.float64), head["classifier.0.bias"].astype(np.float64)
        return float((np.linalg.norm(weight, 2) * np.sqrt(dim) + np.linalg.norm(bias)) ** 2)

    def initial_head(self) -> dict[str, np.ndarray]:
        """The trainable part before round 1: the backbone's pretrained tail after the cut (if
        any) and a seeded classifier."""
        if self._initial_head is None:
            config = self.config
            head = make_trainable(
                self.spec.name,
                config.cut,
                config.head,
                len(self.classes),
                config.mlp_hidden,
                config.seed,
                model=build_backbone(self.spec.name, self.backbone_state) if config.cut else None,
            )
            self._initial_head = head.arrays()
        return dict(self._initial_head)

    def head_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: array.shape for name, array in self.initial_head().items()}

    def trainable(self, arrays: dict[str, np.ndarray]) -> Trainable:
        """The trainable part holding ``arrays``: at cut 0 the NumPy head the clients train, so
        the server scores the very function they compute."""
        config = self.config
        head = make_trainable(self.spec.name, config.cut, config.head, len(self.classes), config.mlp_hidden)
        head.load(arrays)
        return head

    def head(self, arrays: dict[str, np.ndarray]) -> Head:
        """The trainable part holding ``arrays`` as a torch module (what the export builds on)."""
        config = self.config
        head = build_head(self.spec.name, config.cut, config.head, len(self.classes), config.mlp_hidden)
        load_head_arrays(head, arrays)
        return head

    # --- central evaluation ----------------------------------------------------------------------

    def evaluate(self, arrays: dict[str, np.ndarray]) -> ClassificationReport:
        head = self.trainable(arrays)
        return head.evaluate(self.test.features, self.test.labels, len(self.classes), self.config.average_views)

    def record_initialisation(self, **facts: Any) -> None:
        """What the one-shot initialisation (FedNCM, Fed3R, LDA) took and found (summary.json's
        ``head_init``); its class counts are the class prior from then on."""
        self.initialisation = facts
        if sum(facts.get("class_counts", ())) > 0:
            self.class_counts = tuple(int(c) for c in facts["class_counts"])
        self.run_log.event(EventKind.HEAD_INITIALISED, **facts)
        log.info(
            "head initialised by %s from %d node(s): classes %s set, %s down, %s up",
            facts.get("method"),
            facts.get("nodes", 0),
            facts.get("classes_set"),
            human_bytes(facts.get("bytes_down", 0)),
            human_bytes(facts.get("bytes_up", 0)),
        )

    def record_round(self, record: RoundRecord, report: ClassificationReport) -> None:
        record.accuracy, record.macro_f1, record.loss = report.accuracy, report.macro_f1, report.loss
        record.balanced_accuracy = report.balanced_accuracy
        self.rounds.append(record)
        self.final_report = report
        self.run_log.event(
            EventKind.ROUND_END,
            **asdict(record),
            per_class_recall=report.per_class_recall,
            confusion_matrix=report.confusion_matrix,
        )
        log.info(
            "round %3d/%d | accuracy %.4f | macro-F1 %.4f | balanced %.4f | recall %s | loss %.4f | down %s | "
            "up %s | %5.1fs | clients ok %d failed %d rejected %d%s",
            record.round,
            self.config.num_server_rounds,
            record.accuracy,
            record.macro_f1,
            record.balanced_accuracy,
            "/".join(f"{r:.2f}" for r in report.per_class_recall),
            record.loss,
            human_bytes(record.bytes_down),
            human_bytes(record.bytes_up),
            record.seconds,
            record.clients_ok,
            record.clients_failed,
            record.clients_rejected,
            f" | epsilon {record.dp_epsilon:.3f} at delta {self.config.dp_delta:g}" if self.config.dp else "",
        )


def _open_run_folder(
    config: RunConfig, fp: str, classes: tuple[str, ...], flower_run_id: int | None
) -> tuple[Checkpoint | None, RunLog]:
    """The run folder: a new one, or the resumed run's with its checkpoint (checked against
    this run's backbone, classes and strategy)."""
    if config.resume_from:
        run_dir = Path(config.resume_from).expanduser().resolve()
        checkpoint = Checkpoint.load(run_dir)
        checkpoint.check_matches(fp, classes, config.strategy)
        shapes = trainable_shapes(config.backbone, config.cut, config.head, len(classes), config.mlp_hidden)
        checkpoint.check_content(run_dir, shapes, config.num_server_rounds)
        log.info("Resuming %s after round %d", run_dir, checkpoint.round)
        return checkpoint, RunLog(run_dir, resume=True)
    run_dir = Path(config.runs_dir).expanduser().resolve() / new_run_id(flower_run_id, config.run_name)
    return None, RunLog(run_dir)


def check_server_engine(variants: BackboneVariants, engine: EngineKind, num_threads: int, min_cosine: float) -> float:
    """The server's own engine on the golden batch it sends the nodes: its held-out embedding must
    be in the feature space it holds the nodes to, at ``min_cosine`` (golden-min-cosine; warned
    loudly if not)."""
    golden = variants.golden()
    cosine = golden.cosine(variants.engine(engine, num_threads)(golden.images.astype(np.float32)))
    if cosine < min_cosine:
        log.warning(
            "!!! The server's %s engine computes its own golden features at mean cosine %.4f, below "
            "golden-min-cosine=%g: its held-out evaluation is not in the nodes' feature space; choose "
            "engine='onnx' for the run. !!!",
            engine.name,
            cosine,
            min_cosine,
        )
    return cosine


def embed_held_out(
    config: RunConfig,
    variants: BackboneVariants,
    engine: EngineKind,
    preprocess: PreprocessSpec,
    files: LabelledFiles,
) -> Embedded:
    """The server's held-out images at the cut, in the views it scores on (cached)."""
    space = embedding_space(variants.variant_fingerprint(engine), config.cut)
    cache = EmbeddingCache(server_cache_dir(config) / "embeddings", space)
    try:
        return embed_files(
            files,
            lambda: variants.engine(engine, config.num_threads),  # only on a miss
            preprocess,
            cache,
            config.embed_batch_size,
            progress_logger("server (held-out test)"),
            who="server",
            views=config.evaluation_views(),
        )
    finally:
        cache.close()


def server_cache_dir(config: RunConfig) -> Path:
    return config.resolved_cache_dir() / "server"


def backbone_variants(
    config: RunConfig,
    name: str,
    state: dict[str, torch.Tensor],
    preprocess: PreprocessSpec,
    fp: str,
    test_files: LabelledFiles,
) -> BackboneVariants:
    """The server's engine variants of its backbone, int8 calibrated on its held-out images."""
    return BackboneVariants(
        server_cache_dir(config) / "engines",
        name,
        state,
        preprocess,
        fp,
        calibration=lambda: calibration_images(test_files, preprocess),
        cut=config.cut,
    )


def server_test_files(config: RunConfig) -> LabelledFiles:
    """The server's own labelled held-out images."""
    if config.dataset == DatasetKind.FOLDER:
        files = scan_image_folder(config.server_test_dir, config.classes())
        counts = np.bincount(np.asarray(files.labels, dtype=int), minlength=len(config.classes()))
        absent = [name for name, count in zip(config.classes(), counts, strict=True) if count == 0]
        if absent:
            raise DataError(
                f"The server's held-out folder {config.server_test_dir!r} has no usable images of {absent}: the run "
                "could not score them. Add a few labelled images of every class in 'class-names' to it."
            )
        return files
    _, test = elpv_split(config.elpv_task, config.subset, config.test_fraction, config.seed)
    return test
