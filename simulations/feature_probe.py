"""Would other frozen features of the embedded EfficientNet-Lite0 find ELPV's rare defect levels?
Centralised probes on pooling variants and on the images' native 300 px. In process.

    python -m simulations.feature_probe       # about 8 minutes on 2 cores

The run embeds the images as they are (the identity view) with the float torch backbone at 224
and 300 px, and pools the last feature map (1280 channels) by its mean (what edgesplit sends
through the head), its maximum, a generalised mean (p = 3), the mean and maximum side by side, and
the mean of the last block stage's map (320 channels). Each set of features gets the head's
PowerNorm and three classifiers fitted on the union of the 10 default clients' shares and scored
on the server's held-out split: a logistic probe (C 0.1), the same logit-adjusted at tau 0.75,
and the shrinkage LDA head (0.1) logit-adjusted at tau 0.5. Written to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

POOLINGS = ("mean (edgesplit)", "max", "GeM p=3", "mean + max", "last stage, mean")


def pooled_features(paths: tuple[str, ...], image_size: int, batch: int = 32) -> dict[str, np.ndarray]:
    """Every pooling of ``POOLINGS`` of the images at ``paths``, embedded by the float backbone."""
    import torch

    from common.backbones import build_backbone, load_backbone_weights, preprocess_for
    from common.preprocess import decode_image

    model: Any = build_backbone("efficientnet_lite0", load_backbone_weights("efficientnet_lite0"))
    preprocess = preprocess_for("efficientnet_lite0", image_size, 1.0)
    out: dict[str, list[np.ndarray]] = {name: [] for name in POOLINGS}
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            images = [preprocess(decode_image(Path(p).read_bytes())) for p in paths[start : start + batch]]
            stage = model.blocks(model.bn1(model.conv_stem(torch.from_numpy(np.stack(images)))))
            last = model.bn2(model.conv_head(stage))  # the 1280-channel map edgesplit pools
            mean, peak = last.mean((2, 3)), last.amax((2, 3))
            gem = last.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
            for name, value in zip(
                POOLINGS, (mean, peak, gem, torch.cat([mean, peak], 1), stage.mean((2, 3))), strict=True
            ):
                out[name].append(value.numpy())
    return {name: np.concatenate(values) for name, values in out.items()}


def scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> list[str]:
    """Accuracy / macro-F1 of the three classifiers on PowerNorm'd features."""
    from sklearn.linear_model import LogisticRegression

    from common.balance import class_prior
    from common.fed3r import add_stats, ridge_sums, solve_lda
    from common.metrics import classification_report
    from common.numpy_head import power_norm

    train, test = power_norm(train_x.astype(np.float32)), power_norm(test_x.astype(np.float32))
    classes = int(train_y.max()) + 1
    log_prior = np.log(class_prior(np.bincount(train_y, minlength=classes)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = LogisticRegression(C=0.1, max_iter=3000).fit(train, train_y).decision_function(test)
    stats = add_stats([ridge_sums(lambda z: z, train[:, None], train_y, classes)])
    weight, bias = solve_lda(stats, 0.1)
    lda = test @ weight.T + bias - 0.5 * log_prior
    cells = []
    for predicted in (logits.argmax(1), (logits - 0.75 * log_prior).argmax(1), lda.argmax(1)):
        report = classification_report(test_y, predicted, classes)
        cells.append(f"{report.accuracy:.3f} / {report.macro_f1:.3f}")
    return cells


def main(argv: list[str] | None = None) -> int:
    from client.edge_client import EdgeClient
    from common.config import NodeConfig, RunConfig
    from deploy.local_simulation import PROJECT_ROOT
    from server.server_run import server_test_files
    from simulations.benchmark import markdown_table, update_section

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    config = RunConfig()
    train_paths: list[str] = []
    train_labels: list[int] = []
    for partition_id in range(args.clients):
        data = EdgeClient(config, NodeConfig(partition_id=partition_id, num_partitions=args.clients)).data
        for share in (data.train, data.test):
            train_paths += share.paths
            train_labels += share.labels
    test = server_test_files(config)
    rows = []
    for size in (224, 300):
        started = time.perf_counter()
        train = pooled_features(tuple(train_paths), size)
        held_out = pooled_features(test.paths, size)
        print(f"{size} px: {len(train_paths) + len(test.paths)} images in {time.perf_counter() - started:.0f} s")
        for name in POOLINGS:
            cells = scores(train[name], np.array(train_labels), held_out[name], np.array(test.labels))
            rows.append((f"{size} px, {name}", str(train[name].shape[1]), *cells))
            print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(
        rows,
        (
            "features",
            "dimension",
            "logistic probe",
            "logistic, logit-adjusted tau 0.75",
            "LDA (0.1), logit-adjusted tau 0.5",
        ),
    )
    update_section(
        args.output,
        "Frozen features for the rare levels (exploration, in process)",
        "Command: `python -m simulations.feature_probe`. x86-64 AMD EPYC with AVX-512 VNNI, 2 cores, the\n"
        "float torch backbone (not the int8 engine the runs use), one view (the image as it is); ELPV,\n"
        "the 10 default clients' shares pooled (1,968 images) and the server's 656 held out. Each cell is\n"
        "held-out accuracy / macro-F1. One view and one C, so the figures sit a little below the eight-view\n"
        "runs'; the question is only whether any pooling or the native resolution moves macro-F1.\n\n" + table + "\n",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
