"""What a finished (or stopped) run leaves: the final evaluation, the head, the deployable model,
summary.json, the report and the terminal table. Plain Python, no Flower imports."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from common.backbones import build_backbone
from common.config import RunConfig
from common.engines import ONNX_ENGINES
from common.export import export_model
from common.kinds import DatasetKind, EventKind
from common.metrics import precision_recall_curve, recall_at_precision
from common.split import split_backbone
from server.checkpoint import count_releases
from server.dp import epsilon_spent
from server.ledger import RoundRecord, human_bytes
from server.report import write_report
from server.run_folder import RunLog, write_json_atomic
from server.server_run import ServerRun

log = logging.getLogger(__name__)


def finish(run: ServerRun, final_arrays: dict[str, np.ndarray], stopped: str | None = None) -> dict[str, Any]:
    """Final evaluation, head, deployable model, summary and report. ``stopped`` is why the
    run ended before its last round (the summary says so; the checkpoint allows resuming)."""
    report = run.evaluate(final_arrays)
    head_path = save_head(run, final_arrays)
    model_dir = export(run, final_arrays) if run.config.export_model else None
    summary = {
        "final": {
            "accuracy": report.accuracy,
            "macro_precision": report.macro_precision,
            "macro_recall": report.macro_recall,
            "macro_f1": report.macro_f1,
            "balanced_accuracy": report.balanced_accuracy,
            "per_class_recall": report.per_class_recall,
            "confusion_matrix": report.confusion_matrix,
            "loss": report.loss,
            "test_examples": report.num_examples,
        },
        "classes": list(run.classes),
        "operating_points": operating_points(run, final_arrays),
        "head_init": run.initialisation or {"method": run.config.head_init},
        "class_balance": run.config.class_balance,
        "local_prior_correction": run.config.local_prior_correction,
        "rounds": [asdict(r) for r in run.rounds],
        "embedding": {
            "computed": run.embedding.computed,
            "cached": run.embedding.cached,
            "skipped": run.embedding.skipped,
        },
        "wall_seconds": time.perf_counter() - run.started,
        # engine: what the server embedded its held-out images with (each client's is in events.jsonl)
        "backbone": {"name": run.spec.name, "fingerprint": run.fingerprint, "engine": run.engine.name},
        "golden_min_cosine": run.config.golden_min_cosine,
        "nodes": {str(node): entry for node, entry in sorted(run.nodes.items())},  # engines, golden checks
        "head_path": str(head_path),
        "model_dir": str(model_dir) if model_dir else None,
        "export_check": check_export(run.config, run.run_log, model_dir, report.accuracy) if model_dir else None,
        "run_dir": str(run.run_log.run_dir),
        "privacy": privacy_summary(run.config, run.rounds, run.dp_releases),
        "completed_rounds": run.rounds[-1].round if run.rounds else 0,
        "stopped": stopped,
    }
    if run.config.dp:
        count_releases(run.run_log.run_dir, run.dp_releases)
    run.run_log.write_summary(summary)
    run.run_log.event(
        EventKind.RUN_END, final_accuracy=report.accuracy, final_macro_f1=report.macro_f1, stopped=stopped
    )
    try:
        log.info("Report: %s", write_report(run.run_log.run_dir))
    except Exception as error:  # like the export: a convenience on top of a finished run
        log.error("Writing report.html failed (%s: %s); the run's results stand.", type(error).__name__, error)
    for line in summary_table(summary).splitlines():
        log.info("%s", line)
    return summary


def save_head(run: ServerRun, final_arrays: dict[str, np.ndarray]) -> Path:
    """head.npz with what it takes to use it: its input, views, classes and backbone."""
    return run.run_log.save_head(
        final_arrays,
        {
            **{"head": run.config.head, "mlp_hidden": run.config.mlp_hidden, "cut": run.config.cut},
            "input": "backbone features at the cut; then the tail (cut > 0), average pooling, PowerNorm "
            "(sqrt, L2 * sqrt(dim)) and the classifier",
            "views": list(run.config.view_names()),
            "average_views": run.config.average_views,
            "classes": list(run.classes),
            "backbone": {"name": run.spec.name, "fingerprint": run.fingerprint},
            "preprocess": asdict(run.preprocess),
        },
    )


def privacy_summary(config: RunConfig, rounds: list[RoundRecord], releases: list[float]) -> dict[str, Any] | None:
    """summary.json's ``privacy``: the DP settings and the budget spent by the ``releases`` (the noise
    multiplier of each), not by the recorded ``rounds``: a run stopped after a round released its
    head, before recording it, has released that head too (None without DP)."""
    if not config.dp:
        return None
    noised = [r for r in rounds if r.dp_noise_multiplier > 0]
    return {
        "guarantee": "client-level (one node added or removed), on the released heads only; the server is "
        "trusted to add the noise (README, Differential privacy)",
        "clipping_norm": config.dp_clipping_norm,
        "noise_multiplier": config.dp_noise_multiplier,
        "delta": config.dp_delta,
        "epsilon": epsilon_spent(releases, config.dp_delta),
        "noised_rounds": len(noised),
        "releases": len(releases),
        "fraction_train": config.fraction_train,
        "accountant": "Flower's RDP accountant (dp-accounting), no amplification by sampling claimed",
    }


def export(run: ServerRun, arrays: dict[str, np.ndarray]) -> Path | None:
    """Backbone + trained head as ONNX (fp32, int8) and TorchScript in ``<run>/model/``.
    A failure is logged and recorded; the run's results stand without it."""
    directory = run.run_log.run_dir / "model"
    try:
        prefix, _ = split_backbone(run.spec.name, build_backbone(run.spec.name, run.backbone_state), run.config.cut)
        written = export_model(
            directory,
            prefix,
            run.head(arrays),
            {engine: run.variants.path(engine) for engine in ONNX_ENGINES},
            info={
                "classes": list(run.classes),
                "feature_dim": run.spec.feature_dim,
                "cut": run.config.cut,
                "feature_shape": list(run.test.features.shape[2:]),
                "views": list(run.config.evaluation_views()),
                "preprocess": asdict(run.preprocess),
                "backbone": {
                    "name": run.spec.name,
                    "fingerprint": run.fingerprint,
                    "variants": {e: run.variants.variant_fingerprint(e) for e in ONNX_ENGINES},
                },
                "head": {"kind": run.config.head, "mlp_hidden": run.config.mlp_hidden},
                # the numerics the head was trained and scored with: what `edgesplit predict` runs
                "trained_with": {"engine": run.engine.name, "variant": run.variants.variant_fingerprint(run.engine)},
            },
        )
    except Exception as error:  # the export is a convenience on top of a finished run
        log.error("Exporting the model failed (%s: %s); the run's results stand.", type(error).__name__, error)
        run.run_log.event(EventKind.EXPORT_FAILED, reason=f"{type(error).__name__}: {error}")
        return None
    run.run_log.event(EventKind.MODEL_EXPORTED, files={form: path.name for form, path in written.items()})
    log.info("Deployable model: %s (classify images with: edgesplit predict %s <folder>)", directory, directory)
    return directory


def detectors(
    probabilities: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], *, elpv: bool, named: Sequence[str]
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, score, is positive) of each yes/no question the run reports an operating point for:
    ELPV's "defective?" (any class but the first: 1 - its probability) and each class ``named`` in
    ``operating-classes`` (its own probability)."""
    labels = np.asarray(labels)
    questions = []
    if elpv:
        questions.append((f"defective (not {classes[0]})", 1 - probabilities[:, 0], labels != 0))
    for name in named:
        index = classes.index(name)
        questions.append((name, probabilities[:, index], labels == index))
    return questions


def operating_points(run: ServerRun, arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per question (``detectors``): the recall at ``operating-precision`` on the server's held-out
    images, the threshold that gives it, and the precision-recall curve (for the report)."""
    probabilities = run.trainable(arrays).predict_proba(run.test.features, run.config.average_views)
    points: list[dict[str, Any]] = []
    config = run.config
    questions = detectors(
        probabilities,
        run.test.labels,
        run.classes,
        elpv=config.dataset == DatasetKind.ELPV,
        named=config.operating_class_list(),
    )
    for name, scores, positive in questions:
        reached = recall_at_precision(positive, scores, run.config.operating_precision)
        precision, recall, _ = precision_recall_curve(positive, scores)
        points.append(
            {
                "name": name,
                **asdict(reached),
                "curve": {"precision": np.round(precision, 4).tolist(), "recall": np.round(recall, 4).tolist()},
            }
        )
    for point in points:
        log.info(
            "operating point '%s': recall %.3f at precision >= %.2f (threshold %.3f, %d positives held out)",
            point["name"],
            point["recall"],
            point["target_precision"],
            point["threshold"],
            point["positives"],
        )
    return points


# The exported model must score what the run reported, within this many accuracy points.
EXPORT_GAP_POINTS = 0.5


def check_export(config: RunConfig, run_log: RunLog, model_dir: Path, run_accuracy: float) -> dict[str, Any] | None:
    """Score the exported model, as `edgesplit predict` runs it by default, on the server's
    held-out images, and compare with the run's final accuracy; warn loudly past 0.5 points."""
    from server.server_run import server_cache_dir, server_test_files

    try:
        files = server_test_files(config)
        labelled = list(zip(files.paths, files.labels, strict=True))
        accuracy, form = _scored(model_dir, labelled, server_cache_dir(config) / "export-checks")
    except Exception as error:  # like the export: a check on top of a finished run
        log.error("Scoring the exported model failed (%s: %s).", type(error).__name__, error)
        return None
    gap = 100 * (accuracy - run_accuracy)
    check = {"form": form, "accuracy": accuracy, "run_accuracy": run_accuracy, "gap_points": round(gap, 4)}
    check["ok"] = bool(abs(gap) <= EXPORT_GAP_POINTS)
    run_log.event(EventKind.EXPORT_CHECKED, **check)
    if not check["ok"]:
        log.warning(
            "!!! The exported model (%s) scores %.4f on the server's held-out images, %.2f points from the "
            "run's %.4f (more than %.1f): the deployed model does not compute what the run measured. !!!",
            form,
            accuracy,
            gap,
            run_accuracy,
            EXPORT_GAP_POINTS,
        )
    else:
        log.info("Exported model (%s) on the held-out images: %.4f (run: %.4f)", form, accuracy, run_accuracy)
    return check


def _scored(model_dir: Path, files: list[tuple[str, int]], cache_dir: Path) -> tuple[float, str]:
    """``accuracy_of`` the exported model, remembered in ``cache_dir`` by a hash of the model's files
    and of the images (path, size, time): scoring 656 images in 8 views takes half a minute, and a
    warm re-run exports the very same model."""
    from common.exported_model import accuracy_of

    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("model*")):
        if path.suffix in (".json", ".onnx"):  # what predict reads (not the TorchScript form)
            digest.update(path.name.encode() + path.read_bytes())
    for name, label in files:
        stat = Path(name).stat()
        digest.update(f"{name}|{label}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    cached = cache_dir / f"{digest.hexdigest()[:32]}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        document = json.loads(cached.read_text())
        return float(document["accuracy"]), str(document["form"])
    accuracy, form = accuracy_of(model_dir, files)
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cached, {"accuracy": accuracy, "form": form})
    return accuracy, form


def summary_table(summary: dict[str, Any]) -> str:
    """A fixed-width table of the run for the terminal."""
    final, rounds = summary["final"], summary["rounds"]
    lines = [
        "",
        f"{'round':>5} {'accuracy':>9} {'macro-F1':>9} {'balanced':>9} {'loss':>7} {'down':>9} {'up':>9}"
        f" {'sec':>6} {'ok':>3} {'fail':>4}",
    ]
    for r in rounds:
        lines.append(
            f"{r['round']:>5} {r['accuracy']:>9.4f} {r['macro_f1']:>9.4f} {r['balanced_accuracy']:>9.4f} "
            f"{r['loss']:>7.4f} "
            f"{human_bytes(r['bytes_down']):>9} {human_bytes(r['bytes_up']):>9} {r['seconds']:>6.1f} "
            f"{r['clients_ok']:>3} {r['clients_failed']:>4}"
        )
    emb = summary["embedding"]
    recall = [round(x, 3) for x in final["per_class_recall"]]
    lines += [
        "",
        f"final accuracy {final['accuracy']:.4f} | macro-P {final['macro_precision']:.4f} | "
        f"macro-R {final['macro_recall']:.4f} | macro-F1 {final['macro_f1']:.4f} | "
        f"balanced accuracy {final['balanced_accuracy']:.4f} on {final['test_examples']} held-out images",
        f"per-class recall {dict(zip(summary['classes'], recall, strict=True))}",
        f"confusion matrix (rows true, columns predicted): {final['confusion_matrix']}",
        *(
            f"operating point '{p['name']}': recall {p['recall']:.3f} at precision >= {p['target_precision']:.2f}"
            for p in summary.get("operating_points", [])
        ),
        f"embeddings computed {emb['computed']}, read from cache {emb['cached']}, skipped {emb['skipped']}",
        f"wall time {summary['wall_seconds']:.1f}s | run folder {summary['run_dir']}",
    ]
    privacy = summary.get("privacy")
    if privacy:
        lines.append(
            f"differential privacy: epsilon {privacy['epsilon']:.3f} at delta {privacy['delta']:g} after "
            f"{privacy['noised_rounds']} noised rounds (noise multiplier {privacy['noise_multiplier']:g}, "
            f"clipping norm {privacy['clipping_norm']:g})"
        )
    return "\n".join(lines)
