"""The default head, decided from five splits: the old default (random start, 30 rounds of FedAvg)
against the federation's LDA head with logit adjustment from secure sums (every image counts: the
floor is on the sum), alone or fine-tuned, and the clear LDA head (each board's floor of 5 per
class) beside the centralised logistic probe. ELPV, 10 clients, Dirichlet 0.3, five seeds (each
seed draws the server's stratified held-out split and the partition anew). In process.

    python -m simulations.secure_default          # about 10 minutes after `make run` filled the caches

Five Flower runs per variant are too heavy for a shared 2-core machine, so this runs the project's
own plain-Python core over cached embeddings (simulations/fed3r_sweep.py: the NumPy head trained
as a board trains it on its training share, Flower's FedAvg, the server's closed-form solve). The
secure variants sum the boards' statistics as the secure sum does: each board's part encoded in
the fixed point of common/secure_sum.py, summed modulo 2**62 and decoded (the masks cancel). Every
image is embedded once from the caches of the default run (seed 42), whatever the seed's split.
Figures: mean and spread (standard deviation) over the seeds of held-out accuracy, macro-F1,
balanced accuracy, mean absolute error in defect levels (the four levels are ordered) and the
recall of each level. Writes its table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np

from common import secure_sum
from common.balance import class_prior
from common.config import NodeConfig, RunConfig
from common.fed3r import ridge_sums
from common.kinds import HeadInit, HeadKind
from common.metrics import ClassificationReport
from common.numpy_head import NumpyHead, initial_arrays
from common.protocol import RidgeStats
from simulations.fed3r_sweep import GENTLE, Pool, centralised_logistic, closed_form_start, evaluate, federate

SEEDS = (42, 43, 44, 45, 46)
CLIENTS = 10
LDA_KEYS = {"head-init": "lda", "class-balance": "logit-adjusted", "logit-adjust-tau": 0.5}
FT_ROUNDS = 10


def all_images(config: RunConfig) -> dict[str, tuple[np.ndarray, int]]:
    """Every ELPV image's eight-view embedding and label, by path, from the default run's caches."""
    from client.local_data import load_local_data
    from deploy.reference_probe import run_embedder
    from server.server_run import server_cache_dir, server_test_files

    embed = run_embedder(config)
    found: dict[str, tuple[np.ndarray, int]] = {}
    shares = [(server_test_files(config), server_cache_dir(config), config.evaluation_views())]
    for k in range(CLIENTS):
        node = NodeConfig(partition_id=k, num_partitions=CLIENTS)
        data = load_local_data(config, node)
        cache = config.resolved_cache_dir() / f"node-{k}"
        shares += [(data.train, cache, config.view_names()), (data.test, cache, config.view_names())]
    for files, cache, views in shares:
        embedded = embed(files, cache, views)
        for path, row, label in zip(files.paths, embedded.features, embedded.labels, strict=True):
            found[path] = (row, int(label))
    return found


def split_of(
    images: dict[str, tuple[np.ndarray, int]], config: RunConfig, clients: int = CLIENTS
) -> tuple[Pool, list[np.ndarray]]:
    """The seed's split as a run with ``config`` over ``clients`` makes it: the server's held-out
    files, and each client's training share (the board trains on it; its local test share is not
    scored here)."""
    from client.local_data import load_local_data
    from server.server_run import server_test_files

    test = server_test_files(config)
    train_x: list[np.ndarray] = []
    train_y: list[int] = []
    parts: list[np.ndarray] = []
    for k in range(clients):
        share = load_local_data(config, NodeConfig(partition_id=k, num_partitions=clients)).train
        parts.append(np.arange(len(train_y), len(train_y) + len(share.paths)))
        train_x += [images[p][0] for p in share.paths]
        train_y += [images[p][1] for p in share.paths]
    pool = Pool(
        np.stack(train_x),
        np.array(train_y),
        np.stack([images[p][0] for p in test.paths]),
        np.array([images[p][1] for p in test.paths]),
        len(config.classes()),
        True,
    )
    return pool, parts


def lda_statistics(
    pool: Pool, parts: list[np.ndarray], start: dict[str, np.ndarray], secure: bool, floor: int = 5
) -> RidgeStats:
    """The federation's statistics: in the clear, each board leaving out a class it holds fewer
    than ``floor`` images of and summing in float64; secure, every image, each board's part in fixed
    point summed modulo the range as the unmasked secure sum is."""
    head = NumpyHead(HeadKind.LINEAR, start)
    boards = [
        ridge_sums(head.last_inputs, pool.train_x[s], pool.train_y[s], pool.num_classes, 1 if secure else floor)
        for s in parts
    ]
    names = ("counts", "gram", "sums")
    if not secure:
        return RidgeStats(**{n: np.sum([getattr(b, n).astype(np.float64) for b in boards], axis=0) for n in names})
    total = [np.zeros(getattr(boards[0], n).shape, dtype=np.int64) for n in names]
    for board in boards:
        encoded = secure_sum.encode([getattr(board, n) for n in names])
        total = [np.mod(t + e, secure_sum.MOD_RANGE) for t, e in zip(total, encoded, strict=True)]
    return RidgeStats(**dict(zip(names, secure_sum.decode(total), strict=True)))


def level_error(report: ClassificationReport) -> float:
    """Mean absolute error in defect levels: the confusion matrix weighted by |true - predicted|."""
    matrix = np.asarray(report.confusion_matrix, dtype=np.float64)
    levels = np.arange(len(matrix))
    return float((matrix * np.abs(levels[:, None] - levels[None, :])).sum() / max(matrix.sum(), 1))


def one_seed(
    images: dict[str, tuple[np.ndarray, int]], seed: int, work: Path
) -> dict[str, ClassificationReport | float]:
    base = RunConfig.from_flower({"seed": seed})
    pool, parts = split_of(images, base)
    start = initial_arrays(HeadKind.LINEAR, pool.train_x.shape[-1], pool.num_classes, seed=seed)
    lda = RunConfig.from_flower({**base.to_flower(), **LDA_KEYS})
    found: dict[str, ClassificationReport | float] = {}
    found["old default (random, 30 rounds)"] = federate(pool, parts, base, start, base.num_server_rounds)[-1]
    secured = lda_statistics(pool, parts, start, secure=True)
    clear = lda_statistics(pool, parts, start, secure=False)
    exact = lda_statistics(pool, parts, start, secure=False, floor=1)  # every image, in float64
    secure_head = closed_form_start(pool, lda, HeadInit.LDA, start, secured)
    found["LDA, tau 0.5, clear (floor 5 per board)"] = evaluate(
        pool, HeadKind.LINEAR, closed_form_start(pool, lda, HeadInit.LDA, start, clear)
    )
    found["LDA, tau 0.5, secure sums (0 rounds)"] = evaluate(pool, HeadKind.LINEAR, secure_head)
    found["LDA, tau 0.5, float sums (reference)"] = evaluate(
        pool, HeadKind.LINEAR, closed_form_start(pool, lda, HeadInit.LDA, start, exact)
    )
    for tau, shrinkage in ((0.25, 0.1), (0.75, 0.1), (1.0, 0.1), (0.5, 0.3)):
        variant = dataclasses.replace(lda, logit_adjust_tau=tau, lda_shrinkage=shrinkage)
        head = closed_form_start(pool, variant, HeadInit.LDA, start, secured)
        found[f"LDA, tau {tau}, shrinkage {shrinkage}, secure sums"] = evaluate(pool, HeadKind.LINEAR, head)
    prior = class_prior(secured.counts)
    for label, keys in {
        f"secure LDA + {FT_ROUNDS} gentle rounds, logit-adjusted": {**GENTLE, "num_server_rounds": FT_ROUNDS},
        f"secure LDA + {FT_ROUNDS} gentle rounds, logit-adjusted, no local correction": {
            **GENTLE,
            "local_prior_correction": False,
            "num_server_rounds": FT_ROUNDS,
        },
    }.items():
        tuned = dataclasses.replace(lda, **keys)
        found[label] = federate(pool, parts, tuned, secure_head, FT_ROUNDS, prior)[-1]
    train = Pool(pool.train_x, pool.train_y, pool.test_x, pool.test_y, pool.num_classes, True)
    found["centralised logistic probe (accuracy)"] = centralised_logistic(train, seed, work)
    return found


def table(results: list[dict[str, Any]]) -> list[str]:
    """Mean +- spread over the seeds, one row per variant."""
    lines = [
        "| variant | accuracy | macro-F1 | balanced accuracy | MAE (levels) | recall p0 / p1/3 / p2/3 / p1 |",
        "|---|---|---|---|---|---|",
    ]
    probe = [r.pop("centralised logistic probe (accuracy)") for r in results]
    for name in results[0]:
        reports = [r[name] for r in results]
        cells = []
        for values in (
            [x.accuracy for x in reports],
            [x.macro_f1 for x in reports],
            [x.balanced_accuracy for x in reports],
            [level_error(x) for x in reports],
        ):
            cells.append(f"{np.mean(values):.4f} +- {np.std(values):.4f}")
        recall = np.mean([x.per_class_recall for x in reports], axis=0)
        lines.append(f"| {name} | {' | '.join(cells)} | {' / '.join(f'{v:.2f}' for v in recall)} |")
    lines.append(f"| centralised logistic probe | {np.mean(probe):.4f} +- {np.std(probe):.4f} | | | | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    parser.add_argument("--write", default="BENCHMARKS.md", help="file to append the table to ('' for none)")
    args = parser.parse_args(argv)
    images = all_images(RunConfig())
    results = []
    fits = RunConfig().resolved_cache_dir() / "reference-probe"  # the probe's fits, kept for a re-run
    for seed in args.seeds:
        results.append(one_seed(images, seed, fits))
        accuracies = (f"{k}: {v if isinstance(v, float) else v.accuracy:.4f}" for k, v in results[-1].items())
        print(f"seed {seed}: " + ", ".join(accuracies), flush=True)
    lines = table(results)
    print("\n".join(lines))
    if args.write:
        section = "\n".join(
            [
                "",
                "## The default head from five splits: secure LDA against the old default",
                "",
                f"Command: `python -m simulations.secure_default` (seeds {', '.join(map(str, args.seeds))}). "
                "In process, x86-64 AMD EPYC with AVX-512 VNNI, 2 cores; see the module's docstring.",
                "",
                *lines,
                "",
            ]
        )
        with Path(args.write).open("a") as handle:
            handle.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
