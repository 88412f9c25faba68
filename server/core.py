"""The cloud side in plain Python: backbone, instructions, central evaluation, run records.

No Flower imports: ``server/app.py`` and ``server/strategy.py`` translate between Flower messages
and the calls here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import wire
from common.backbones import (
    BackboneSpec,
    build_backbone,
    fingerprint,
    get_spec,
    load_backbone_weights,
    preprocess_for,
)
from common.config import RunConfig
from common.data import LabelledFiles, elpv_split, scan_image_folder
from common.embedding import Embedded, EmbeddingCache, embed_files, progress_logger
from common.engines import ONNX_ENGINES, resolve_engine
from common.export import calibration_images, export_model
from common.heads import Head, evaluate_head, head_arrays, load_head_arrays
from common.metrics import ClassificationReport
from common.preprocess import PreprocessSpec
from common.split import build_head, embedding_space, split_backbone
from server.checkpoint import Checkpoint
from server.report import write_report
from server.runlog import RunLog, new_run_id
from server.variants import BackboneVariants

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """What one round did, as summary.json's ``rounds[i]`` shows it."""

    round: int
    accuracy: float = float("nan")
    macro_f1: float = float("nan")
    loss: float = float("nan")
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0
    clients_ok: int = 0
    clients_failed: int = 0
    clients_rejected: int = 0
    backbones_sent: int = 0
    client_accuracy: float = float("nan")  # clients' local test shares, weighted by examples
    client_personal_accuracy: float = float("nan")  # the same shares, each client's personal head
    max_bytes_up_per_client: int = 0
    attempts: int = 1  # more than 1: the round was retried after too few usable updates


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
    engine: str  # what the server embeds its own held-out images with
    started: float = field(default_factory=time.perf_counter)
    rounds: list[RoundRecord] = field(default_factory=list)
    embedding_computed: int = 0
    embedding_cached: int = 0
    images_skipped: int = 0
    final_report: ClassificationReport | None = None
    checkpoint: Checkpoint | None = None  # what a resumed run continues from
    initialisation: dict[str, Any] = field(default_factory=dict)  # how the head was initialised (FedNCM)
    _initial_head: dict[str, np.ndarray] | None = None

    @property
    def start_round(self) -> int:
        """The last round completed before this process started (0 for a new run)."""
        return self.checkpoint.round if self.checkpoint else 0

    @property
    def start_head(self) -> dict[str, np.ndarray]:
        return dict(self.checkpoint.head) if self.checkpoint else self.initial_head()

    def totals(self) -> dict[str, int]:
        return {
            "embedding_computed": self.embedding_computed,
            "embedding_cached": self.embedding_cached,
        }

    # --- start ------------------------------------------------------------------------------

    @classmethod
    def prepare(cls, config: RunConfig, flower_run_id: int | None = None) -> ServerRun:
        """Build the backbone, fingerprint it, open the run folder, embed the held-out test split."""
        started = time.perf_counter()
        spec = get_spec(config.backbone)
        preprocess = preprocess_for(config.backbone, config.image_size, config.crop_pct)
        state = load_backbone_weights(config.backbone, config.backbone_weights or None)
        fp = fingerprint(spec.name, state, preprocess)
        classes = config.classes()
        checkpoint = None
        if config.resume_from:
            run_dir = Path(config.resume_from).expanduser().resolve()
            checkpoint = Checkpoint.load(run_dir)
            checkpoint.check_matches(fp, classes, config.strategy)
            run_log = RunLog(run_dir, resume=True)
            log.info("Resuming %s after round %d", run_dir, checkpoint.round)
        else:
            run_dir = Path(config.runs_dir).expanduser().resolve() / new_run_id(flower_run_id, config.run_name)
            run_log = RunLog(run_dir)
        run_log.write_config(
            {
                "run_config": config.to_flower(),
                "classes": list(classes),
                "backbone": {"name": spec.name, "fingerprint": fp, "feature_dim": spec.feature_dim},
                "preprocess": asdict(preprocess),
                "flower_run_id": flower_run_id,
            }
        )
        log.info("Run folder: %s", run_dir)
        log.info("Backbone %s, fingerprint %s", spec.name, fp[:16])
        test_files = server_test_files(config)
        variants = backbone_variants(config, spec.name, state, preprocess, fp, test_files)
        # The server embeds with the run's engine, as a client on this platform would, so its
        # evaluation sees the features the clients train on.
        engine = resolve_engine(config.engine)
        space = embedding_space(variants.variant_fingerprint(engine), config.cut)
        cache = EmbeddingCache(server_cache_dir(config) / "embeddings", space)
        try:
            test = embed_files(
                test_files,
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
        run = cls(config, spec, state, preprocess, fp, classes, run_log, test, variants, engine, started=started)
        run.embedding_computed, run.embedding_cached = test.stats.computed, test.stats.cached
        run.images_skipped = test.stats.num_skipped
        if checkpoint is not None:
            run.checkpoint = checkpoint
            run.rounds = [RoundRecord(**record) for record in checkpoint.rounds]
            # Embedding work adds up over the run's processes; skipped images are a property of
            # the data, and every client reports its own again after the restart.
            run.embedding_computed += checkpoint.totals.get("embedding_computed", 0)
            run.embedding_cached += checkpoint.totals.get("embedding_cached", 0)
            if run.rounds:
                run.final_report = run.evaluate(checkpoint.head)
        run_log.event(
            "run-resumed" if checkpoint else "run-start",
            **({"from_round": checkpoint.round} if checkpoint else {}),
            backbone=spec.name,
            fingerprint=fp,
            engine=engine,
            test_examples=len(test.labels),
            test_class_counts=np.bincount(test.labels, minlength=len(classes)).tolist(),
            embeddings_computed=test.stats.computed,
            embeddings_cached=test.stats.cached,
        )
        return run

    # --- what goes to clients ------------------------------------------------------------------

    def instructions(self) -> dict[str, Any]:
        """The ConfigRecord content every train/evaluate message carries (minus the round)."""
        config = self.config
        return {
            wire.FINGERPRINT: self.fingerprint,
            wire.BACKBONE_NAME: self.spec.name,
            wire.PREPROCESS: self.preprocess.to_json(),
            wire.HEAD: config.head,
            wire.MLP_HIDDEN: config.mlp_hidden,
            wire.CUT: config.cut,
            wire.VIEWS: ",".join(config.view_names()),
            wire.AVERAGE_VIEWS: config.average_views,
            wire.PERSONAL_EPOCHS: config.personal_epochs,
            wire.NCM_MIN_EXAMPLES: config.ncm_min_examples,
            wire.NUM_CLASSES: len(self.classes),
            wire.LOCAL_EPOCHS: config.local_epochs,
            wire.LEARNING_RATE: config.learning_rate,
            wire.WEIGHT_DECAY: config.weight_decay,
            wire.BATCH_SIZE: config.batch_size,
            wire.PROXIMAL_MU: config.proximal_mu if config.strategy == "fedprox" else 0.0,
            wire.SEED: config.seed,
        }

    def initial_head(self) -> dict[str, np.ndarray]:
        """The trainable part before round 1: the backbone's pretrained tail after the cut (if
        any) and a seeded classifier."""
        if self._initial_head is None:
            config = self.config
            head = build_head(
                self.spec.name,
                config.cut,
                config.head,
                len(self.classes),
                config.mlp_hidden,
                config.seed,
                model=build_backbone(self.spec.name, self.backbone_state) if config.cut else None,
            )
            self._initial_head = head_arrays(head)
        return dict(self._initial_head)

    def head_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: array.shape for name, array in self.initial_head().items()}

    def head(self, arrays: dict[str, np.ndarray]) -> Head:
        """The trainable part holding ``arrays``."""
        config = self.config
        head = build_head(self.spec.name, config.cut, config.head, len(self.classes), config.mlp_hidden)
        load_head_arrays(head, arrays)
        return head

    # --- central evaluation ----------------------------------------------------------------------

    def evaluate(self, arrays: dict[str, np.ndarray]) -> ClassificationReport:
        head = self.head(arrays)
        return evaluate_head(head, self.test.features, self.test.labels, len(self.classes), self.config.average_views)

    def record_initialisation(self, **facts: Any) -> None:
        """What FedNCM's one-shot initialisation took and found (summary.json's ``head_init``)."""
        self.initialisation = facts
        self.run_log.event("head-initialised", **facts)
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
        self.rounds.append(record)
        self.final_report = report
        self.run_log.event(
            "round-end",
            **asdict(record),
            per_class_recall=report.per_class_recall,
            confusion_matrix=report.confusion_matrix,
        )
        log.info(
            "round %3d/%d | accuracy %.4f | macro-F1 %.4f | loss %.4f | down %s | up %s | %5.1fs | "
            "clients ok %d failed %d rejected %d",
            record.round,
            self.config.num_server_rounds,
            record.accuracy,
            record.macro_f1,
            record.loss,
            human_bytes(record.bytes_down),
            human_bytes(record.bytes_up),
            record.seconds,
            record.clients_ok,
            record.clients_failed,
            record.clients_rejected,
        )

    # --- end ----------------------------------------------------------------------------------

    def finish(self, final_arrays: dict[str, np.ndarray], stopped: str | None = None) -> dict[str, Any]:
        """Final evaluation, head, deployable model, summary and report. ``stopped`` is why the
        run ended before its last round (the summary says so; the checkpoint allows resuming)."""
        report = self.evaluate(final_arrays)
        head_path = self.run_log.save_head(
            final_arrays,
            {
                "head": self.config.head,
                "mlp_hidden": self.config.mlp_hidden,
                "cut": self.config.cut,
                "input": "backbone features at the cut; then the tail (cut > 0), average pooling, PowerNorm "
                "(sqrt, L2 * sqrt(dim)) and the classifier",
                "views": list(self.config.view_names()),
                "average_views": self.config.average_views,
                "classes": list(self.classes),
                "backbone": {"name": self.spec.name, "fingerprint": self.fingerprint},
                "preprocess": asdict(self.preprocess),
            },
        )
        model_dir = self.export(final_arrays) if self.config.export_model else None
        summary = {
            "final": {
                "accuracy": report.accuracy,
                "macro_precision": report.macro_precision,
                "macro_recall": report.macro_recall,
                "macro_f1": report.macro_f1,
                "per_class_recall": report.per_class_recall,
                "confusion_matrix": report.confusion_matrix,
                "loss": report.loss,
                "test_examples": report.num_examples,
            },
            "classes": list(self.classes),
            "head_init": self.initialisation or {"method": self.config.head_init},
            "rounds": [asdict(r) for r in self.rounds],
            "embedding": {
                "computed": self.embedding_computed,
                "cached": self.embedding_cached,
                "skipped": self.images_skipped,
            },
            "wall_seconds": time.perf_counter() - self.started,
            # engine: what the server embedded its held-out images with (each client's is in events.jsonl)
            "backbone": {"name": self.spec.name, "fingerprint": self.fingerprint, "engine": self.engine},
            "head_path": str(head_path),
            "model_dir": str(model_dir) if model_dir else None,
            "run_dir": str(self.run_log.run_dir),
            "completed_rounds": self.rounds[-1].round if self.rounds else 0,
            "stopped": stopped,
        }
        self.run_log.write_summary(summary)
        self.run_log.event("run-end", final_accuracy=report.accuracy, final_macro_f1=report.macro_f1, stopped=stopped)
        try:
            log.info("Report: %s", write_report(self.run_log.run_dir))
        except Exception as error:  # like the export: a convenience on top of a finished run
            log.error("Writing report.html failed (%s: %s); the run's results stand.", type(error).__name__, error)
        for line in summary_table(summary).splitlines():
            log.info("%s", line)
        return summary

    def export(self, arrays: dict[str, np.ndarray]) -> Path | None:
        """Backbone + trained head as ONNX (fp32, int8) and TorchScript in ``<run>/model/``.
        A failure is logged and recorded; the run's results stand without it."""
        directory = self.run_log.run_dir / "model"
        try:
            prefix, _ = split_backbone(
                self.spec.name, build_backbone(self.spec.name, self.backbone_state), self.config.cut
            )
            written = export_model(
                directory,
                prefix,
                self.head(arrays),
                {engine: self.variants.path(engine) for engine in ONNX_ENGINES},
                info={
                    "classes": list(self.classes),
                    "feature_dim": self.spec.feature_dim,
                    "cut": self.config.cut,
                    "feature_shape": list(self.test.features.shape[2:]),
                    "views": list(self.config.evaluation_views()),
                    "preprocess": asdict(self.preprocess),
                    "backbone": {
                        "name": self.spec.name,
                        "fingerprint": self.fingerprint,
                        "variants": {e: self.variants.variant_fingerprint(e) for e in ONNX_ENGINES},
                    },
                    "head": {"kind": self.config.head, "mlp_hidden": self.config.mlp_hidden},
                },
            )
        except Exception as error:  # the export is a convenience on top of a finished run
            log.error("Exporting the model failed (%s: %s); the run's results stand.", type(error).__name__, error)
            self.run_log.event("export-failed", reason=f"{type(error).__name__}: {error}")
            return None
        self.run_log.event("model-exported", files={form: path.name for form, path in written.items()})
        log.info("Deployable model: %s (classify images with: edgesplit predict %s <folder>)", directory, directory)
        return directory


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
    if config.dataset == "folder":
        return scan_image_folder(config.server_test_dir, config.classes())
    _, test = elpv_split(config.elpv_task, config.subset, config.test_fraction, config.seed)
    return test


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def summary_table(summary: dict[str, Any]) -> str:
    """A fixed-width table of the run for the terminal."""
    final, rounds = summary["final"], summary["rounds"]
    lines = [
        "",
        f"{'round':>5} {'accuracy':>9} {'macro-F1':>9} {'loss':>7} {'down':>9} {'up':>9} {'sec':>6}"
        f" {'ok':>3} {'fail':>4}",
    ]
    for r in rounds:
        lines.append(
            f"{r['round']:>5} {r['accuracy']:>9.4f} {r['macro_f1']:>9.4f} {r['loss']:>7.4f} "
            f"{human_bytes(r['bytes_down']):>9} {human_bytes(r['bytes_up']):>9} {r['seconds']:>6.1f} "
            f"{r['clients_ok']:>3} {r['clients_failed']:>4}"
        )
    emb = summary["embedding"]
    recall = [round(x, 3) for x in final["per_class_recall"]]
    lines += [
        "",
        f"final accuracy {final['accuracy']:.4f} | macro-P {final['macro_precision']:.4f} | "
        f"macro-R {final['macro_recall']:.4f} | macro-F1 {final['macro_f1']:.4f} "
        f"on {final['test_examples']} held-out images",
        f"per-class recall {dict(zip(summary['classes'], recall, strict=True))}",
        f"confusion matrix (rows true, columns predicted): {final['confusion_matrix']}",
        f"embeddings computed {emb['computed']}, read from cache {emb['cached']}, skipped {emb['skipped']}",
        f"wall time {summary['wall_seconds']:.1f}s | run folder {summary['run_dir']}",
    ]
    return "\n".join(lines)
