"""Partition independence: random init, FedNCM, Fed3R, Fed3R+FT and the federated LDA head (from
Fed3R's statistics) on four splits of ELPV and of the generated 10-class set, beside the
centralised ridge and logistic probes. In process.

    python -m simulations.fed3r_sweep                 # ELPV and the generated set, a few minutes
    python -m simulations.fed3r_sweep --explore       # ELPV default candidates only (no file written)

32 Flower runs are too heavy for a shared 2-core machine, so this runs the project's own
plain-Python core over cached embeddings: the NumPy head's training exactly as a board runs it
(client/edge_client.py's seeds, learning-rate schedule, class balance), Flower's own FedAvg
aggregation (``aggregate_arrayrecords``), the clients' FedNCM and Fed3R statistics and the
server's solve and temperature calibration (server/head_init.py's functions). Every client
trains every round on its whole share (no local test share). What the Flower runtime adds
(messages, screening, retries) changes no number here; simulations/fed3r_default.py measures the
ELPV default through it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict

from common.balance import class_prior, posthoc_offsets, training_offsets
from common.config import RunConfig
from common.data import LabelledFiles, partition
from common.fed3r import (
    add_stats,
    calibrated_temperature,
    ridge_head_arrays,
    ridge_scores,
    ridge_sums,
)
from common.flower_glue import aggregate_array_records, from_array_record, to_array_record
from common.kinds import FROM_RIDGE_SUMS, ClassBalance, HeadInit, HeadKind
from common.metrics import ClassificationReport
from common.numpy_head import NumpyHead, initial_arrays, layer_names, ncm_head_arrays
from common.protocol import RidgeStats

SPLITS: dict[str, dict[str, Any]] = {
    "IID": {"partitioner": "iid"},
    "Dirichlet 0.3": {"partitioner": "dirichlet", "dirichlet-alpha": 0.3},
    "Dirichlet 0.1": {"partitioner": "dirichlet", "dirichlet-alpha": 0.1},
    "2 classes per client": {"partitioner": "pathological", "classes-per-client": 2},
}
# The generated set's gratings at this contrast against their noise (simulations/pathological.py
# draws them at 100): at 100 every method scores 1.000 and none can be told apart; at 8 the
# centralised probes score about 0.8.
HARD_CONTRAST = 8.0
FLOOR = 5  # a board's default floor of examples per class for shared statistics (client/privacy.py)


@dataclass
class Pool:
    """Every client's images as embeddings (before any split), and the server's held-out ones."""

    train_x: np.ndarray  # (n, views, d) float16
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    average_views: bool


def elpv_pool(config: RunConfig, clients: int = 10) -> Pool:
    """ELPV minus the server's held-out split, in the run's views, from the caches a default run
    filled (``make run``): the 10 default clients' train and test shares are the whole pool."""
    from client.edge_client import EdgeClient
    from common.config import NodeConfig
    from deploy.reference_probe import run_embedder
    from server.server_run import server_cache_dir, server_test_files

    embed = run_embedder(config)
    xs, ys = [], []
    for partition_id in range(clients):
        client = EdgeClient(config, NodeConfig(partition_id=partition_id, num_partitions=clients))
        for share in (client.data.train, client.data.test):
            embedded = embed(share, client.cache_dir, config.view_names())
            xs.append(embedded.features)
            ys.append(embedded.labels)
    test = embed(server_test_files(config), server_cache_dir(config), config.evaluation_views())
    return Pool(np.concatenate(xs), np.concatenate(ys), test.features, test.labels, len(config.classes()), True)


# Images per class in the generated set: 160 for the clients, 40 held out (400), so that one
# image moves held-out accuracy by 0.25 points, finer than the 1-point target it is judged by.
GENERATED_PER_CLASS, GENERATED_HELD_OUT = 160, 40


def generated_pool(work: Path, contrast: float) -> tuple[Pool, RunConfig]:
    """The generated 10-class set of simulations/pathological.py (``GENERATED_PER_CLASS`` +
    ``GENERATED_HELD_OUT`` images per class, 64 px, its gratings at ``contrast`` against the noise),
    embedded by the default engine into a cache under ``work``."""
    from common.data import scan_image_folder
    from deploy.reference_probe import run_embedder
    from server.server_run import server_test_files
    from simulations.pathological import CLASSES, run_config, write_pathological_data

    root = write_pathological_data(
        work / "data", per_class=GENERATED_PER_CLASS, test_per_class=GENERATED_HELD_OUT, contrast=contrast
    )
    config = RunConfig.from_flower(run_config(root, work / "cache", work / "runs", "sweep"))
    embed = run_embedder(config)
    train = embed(scan_image_folder(root / "pool", CLASSES), work / "cache")
    test = embed(server_test_files(config), work / "cache")
    return Pool(train.features, train.labels, test.features, test.labels, len(CLASSES), True), config


def shares(labels: np.ndarray, clients: int, config: RunConfig) -> tuple[list[np.ndarray], int]:
    """Each client's rows of the pool, by the run's flwr-datasets partitioner, and the seed that
    made them: a Dirichlet draw that leaves a client nearly empty is drawn again with the next seed
    (flwr-datasets gives up after 10 attempts at alpha 0.1 here)."""
    from common.data import DataError

    files = LabelledFiles(tuple(str(i) for i in range(len(labels))), tuple(int(y) for y in labels), ())
    for seed in range(config.seed, config.seed + 10):
        try:
            parts = [
                partition(
                    files, clients, k, config.partitioner, seed, config.dirichlet_alpha, config.classes_per_client
                )
                for k in range(clients)
            ]
        except DataError:
            continue
        return [np.array([int(p) for p in part.paths]) for part in parts], seed
    raise RuntimeError(f"no {config.partitioner} split of {len(labels)} examples over {clients} clients in 10 seeds")


def evaluate(pool: Pool, kind: HeadKind, arrays: dict[str, np.ndarray]) -> ClassificationReport:
    return NumpyHead(kind, arrays).evaluate(pool.test_x, pool.test_y, pool.num_classes, pool.average_views)


def federate(
    pool: Pool,
    parts: list[np.ndarray],
    config: RunConfig,
    start: dict[str, np.ndarray],
    rounds: int,
    prior: np.ndarray | None = None,
    per_round: int = 0,
) -> list[ClassificationReport]:
    """``rounds`` of FedAvg from ``start``: each client trains the NumPy head as a board does
    (client/edge_client.py), Flower's FedAvg averages by examples; the report after each round.
    ``per_round``: clients sampled each round, seeded by the run's seed (0: every client)."""
    head, reports = dict(start), []
    prior_shares = () if prior is None else tuple(prior)
    sampler = np.random.default_rng(config.seed)
    for server_round in range(1, rounds + 1):
        replies = []
        chosen = sorted(sampler.choice(len(parts), per_round, replace=False)) if per_round else range(len(parts))
        for k in chosen:
            share = parts[k]
            if len(share) == 0:  # an empty client trains nothing (Flower's FedAvg would weigh it 0)
                continue
            local_counts = np.bincount(pool.train_y[share], minlength=pool.num_classes)
            weights, offsets = training_offsets(
                config.class_balance,
                prior_shares,
                config.logit_adjust_tau,
                local_counts if config.local_prior_correction else None,
            )
            local = NumpyHead(config.head, head)
            result = local.train(
                pool.train_x[share],
                pool.train_y[share],
                epochs=config.local_epochs,
                learning_rate=config.learning_rate_at(server_round),
                batch_size=config.batch_size,
                weight_decay=config.weight_decay,
                seed=config.seed + 1000 * server_round + k,
                class_weights=weights,
                logit_offsets=offsets,
            )
            replies.append(
                RecordDict(
                    {"arrays": to_array_record(local.arrays()), "metrics": MetricRecord({"n": result.num_examples})}
                )
            )
        head = from_array_record(aggregate_array_records(replies, "n"))
        head = {name: value.astype(np.float32) for name, value in head.items()}
        reports.append(evaluate(pool, config.head, head))
    return reports


def ridge_statistics(
    pool: Pool, parts: list[np.ndarray], kind: HeadKind, start: dict[str, np.ndarray], floor: int
) -> RidgeStats:
    head = NumpyHead(kind, start)
    return add_stats(
        [ridge_sums(head.last_inputs, pool.train_x[s], pool.train_y[s], pool.num_classes, floor) for s in parts]
    )


def closed_form_start(
    pool: Pool, config: RunConfig, method: HeadInit, start: dict[str, np.ndarray], stats: RidgeStats
) -> dict[str, np.ndarray]:
    """The server's head from summed statistics (server/head_init.py ``closed_form_head``):
    'fed3r' solves the ridge and calibrates it on the held-out split, 'lda' needs no temperature."""
    from server.head_init import ClosedFormSettings, closed_form_head

    last_inputs = NumpyHead(config.head, start).last_inputs
    settings = ClosedFormSettings.from_config(config)
    return closed_form_head(settings, method, start, stats, last_inputs, pool.test_x, pool.test_y)[0]


def calibrated_head(
    pool: Pool,
    config: RunConfig,
    start: dict[str, np.ndarray],
    weight: np.ndarray,
    bias: np.ndarray,
    counts: np.ndarray,
) -> dict[str, np.ndarray]:
    """A ridge classifier as the head: its temperature calibrated on the held-out split as the
    server does it, its bias adjusted by the prior of ``counts`` if the config balances classes."""
    from server.head_init import heldout_nll

    scores = ridge_scores(NumpyHead(config.head, start).last_inputs, pool.test_x, weight, bias)
    temperature = calibrated_temperature(lambda t: heldout_nll(scores, pool.test_y, t, pool.average_views))
    offsets = posthoc_offsets(config.class_balance, class_prior(counts), config.logit_adjust_tau)
    return ridge_head_arrays(start, layer_names(config.head)[-1], weight, bias, temperature, offsets)


def ncm_start(pool: Pool, parts: list[np.ndarray], start: dict[str, np.ndarray], floor: int) -> tuple[dict, np.ndarray]:
    head = NumpyHead(HeadKind.LINEAR, start)
    sums = [head.class_sums(pool.train_x[s], pool.train_y[s], pool.num_classes, floor) for s in parts]
    counts = np.sum([c for _, c in sums], axis=0)
    return ncm_head_arrays(start, np.sum([s for s, _ in sums], axis=0), counts)[0], counts


def centralised_ridge(pool: Pool, config: RunConfig, start: dict[str, np.ndarray]) -> ClassificationReport:
    """scikit-learn's RidgeClassifier (targets -1/+1, intercept unpenalised, each view a row of
    weight 1/views) on the pooled training features the head sees, scored as the head scores."""
    from sklearn.linear_model import RidgeClassifier

    z = NumpyHead(HeadKind.LINEAR, start).last_inputs(pool.train_x.reshape(-1, pool.train_x.shape[-1]))
    views = pool.train_x.shape[1]
    model = RidgeClassifier(alpha=config.fed3r_lambda, solver="cholesky")
    model.fit(z.astype(np.float64), np.repeat(pool.train_y, views), sample_weight=np.full(len(z), 1 / views))
    # -1/+1 targets: twice the one-hot solution, less 1 on the intercept (the argmax is the same)
    weight, bias = model.coef_ / 2, (model.intercept_ + 1) / 2
    arrays = calibrated_head(pool, config, start, weight, bias, np.bincount(pool.train_y, minlength=pool.num_classes))
    return evaluate(pool, HeadKind.LINEAR, arrays)


def centralised_logistic(pool: Pool, seed: int, directory: Path) -> float:
    """The project's centralised probe (deploy/reference_probe.py): identity views, PowerNorm."""
    from common.numpy_head import power_norm
    from deploy.reference_probe import cached_fit

    train = power_norm(pool.train_x[:, 0].astype(np.float32))
    test = power_norm(pool.test_x[:, 0].astype(np.float32))
    return cached_fit(directory, train, pool.train_y, test, pool.test_y, pool.num_classes, seed).accuracy


# Fine-tuning after Fed3R: the closed-form head is near the optimum already, so one gentle epoch
# per round (and the local-prior correction against label skew) refines it without undoing it.
GENTLE: dict[str, Any] = {"local_epochs": 1, "learning_rate": 0.003, "local_prior_correction": True}


def sweep(pool: Pool, base: RunConfig, rounds: int, clients: int, logistic: float) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    start = initial_arrays(HeadKind.LINEAR, pool.train_x.shape[-1], pool.num_classes, seed=base.seed)
    ridge = centralised_ridge(pool, base, start).accuracy
    for split, overrides in SPLITS.items():
        # the learning-rate schedule spans the rounds run here
        config = RunConfig.from_flower({**base.to_flower(), **overrides, "num-server-rounds": rounds})
        parts, seed = shares(pool.train_y, clients, config)
        exact = closed_form_start(
            pool, config, HeadInit.FED3R, start, ridge_statistics(pool, parts, HeadKind.LINEAR, start, 1)
        )
        floored_stats = ridge_statistics(pool, parts, HeadKind.LINEAR, start, FLOOR)
        fed3r = closed_form_start(pool, config, HeadInit.FED3R, start, floored_stats)
        lda = closed_form_start(pool, config, HeadInit.LDA, start, floored_stats)
        ncm, _ = ncm_start(pool, parts, start, FLOOR)
        counts = np.bincount(pool.train_y[np.concatenate(parts)], minlength=pool.num_classes)  # a counts-only query
        corrected = dataclasses.replace(config, local_prior_correction=True)
        runs = {
            "random": (config, start, None),
            "random, local prior": (corrected, start, class_prior(counts)),
            "FedNCM": (config, ncm, None),
            "Fed3R+FT": (config, fed3r, None),
            "Fed3R+FT, gentle": (dataclasses.replace(config, **GENTLE), fed3r, class_prior(floored_stats.counts)),
            "LDA+FT, gentle": (dataclasses.replace(config, **GENTLE), lda, class_prior(floored_stats.counts)),
        }
        results = {
            name: [r.accuracy for r in federate(pool, parts, run_config, head, rounds, prior)]
            for name, (run_config, head, prior) in runs.items()
        }
        dropped = len(pool.train_y) - int(floored_stats.counts.sum())
        rows.append(
            (
                split if seed == config.seed else f"{split} (seed {seed})",
                *(f"{results[n][0]:.3f} / {results[n][-1]:.3f}" for n in ("random", "random, local prior", "FedNCM")),
                f"{evaluate(pool, HeadKind.LINEAR, exact).accuracy:.4f}",
                f"{evaluate(pool, HeadKind.LINEAR, fed3r).accuracy:.4f} ({dropped} left out)",
                *(f"{results[n][0]:.3f} / {results[n][-1]:.3f}" for n in ("Fed3R+FT", "Fed3R+FT, gentle")),
                f"{evaluate(pool, HeadKind.LINEAR, lda).accuracy:.4f}",
                f"{results['LDA+FT, gentle'][0]:.3f} / {results['LDA+FT, gentle'][-1]:.3f}",
                f"{ridge:.4f}",
                f"{logistic:.3f}",
            )
        )
        print(" | ".join(rows[-1]), flush=True)
    return rows


COLUMNS = (
    "split",
    "random: round 1 / last",
    "random, local-prior correction: round 1 / last",
    "FedNCM: round 1 / last",
    "Fed3R (every example)",
    "Fed3R (floor 5 per class)",
    "Fed3R+FT: round 1 / last",
    "Fed3R+FT, gentle, local-prior correction: round 1 / last",
    "LDA (floor 5)",
    "LDA+FT, gentle, local-prior correction: round 1 / last",
    "centralised ridge",
    "centralised logistic probe",
)


def explore(pool: Pool, base: RunConfig, rounds: int, clients: int, candidates: list[dict[str, Any]]) -> None:
    """ELPV default candidates (run-config keys in snake_case) on the default split: accuracy,
    macro-F1, balanced accuracy."""
    parts, _ = shares(pool.train_y, clients, base)
    for overrides in candidates:
        config = RunConfig.from_flower({**base.to_flower(), **{k.replace("_", "-"): v for k, v in overrides.items()}})
        start = initial_arrays(config.head, pool.train_x.shape[-1], pool.num_classes, config.mlp_hidden, config.seed)
        prior = None
        if config.head_init in FROM_RIDGE_SUMS:
            stats = ridge_statistics(pool, parts, config.head, start, FLOOR)
            prior = class_prior(stats.counts)
            start = closed_form_start(pool, config, config.head_init, start, stats)
        elif config.class_balance != ClassBalance.NONE or config.local_prior_correction:
            prior = class_prior(np.bincount(pool.train_y[np.concatenate(parts)], minlength=pool.num_classes))
        reports = [evaluate(pool, config.head, start), *federate(pool, parts, config, start, rounds, prior)]
        last = reports[-1]
        print(
            f"{overrides} | init {reports[0].accuracy:.4f}/{reports[0].macro_f1:.3f} | "
            f"round 1 {reports[1].accuracy:.4f} "
            f"| last acc {last.accuracy:.4f} F1 {last.macro_f1:.4f} bal {last.balanced_accuracy:.4f} "
            f"recall {[round(r, 2) for r in last.per_class_recall]}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    from deploy.local_simulation import PROJECT_ROOT
    from simulations.benchmark import markdown_table, update_section

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--explore-rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--explore", action="store_true")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    elpv_config = RunConfig()
    elpv = elpv_pool(elpv_config, args.clients)
    print(f"ELPV pool {elpv.train_x.shape}, held out {elpv.test_x.shape} ({time.perf_counter() - started:.0f} s)")
    if args.explore:
        lpc = {"local_prior_correction": True}
        gentle = {"head_init": "fed3r", **GENTLE}
        candidates: list[dict[str, Any]] = [
            {},
            lpc,
            {**lpc, "class_balance": "logit-adjusted", "logit_adjust_tau": 0.5},
            {**lpc, "class_balance": "logit-adjusted", "logit_adjust_tau": 0.75},
            {**lpc, "class_balance": "logit-adjusted"},
            gentle,
            {**gentle, "class_balance": "logit-adjusted", "logit_adjust_tau": 0.5},
            {**gentle, "class_balance": "logit-adjusted", "logit_adjust_tau": 0.75},
            {**gentle, "class_balance": "logit-adjusted"},
            *(
                {
                    "head_init": "lda",
                    "lda_shrinkage": shrinkage,
                    "class_balance": balance,
                    "logit_adjust_tau": 0.75,
                }
                for balance in ("none", "logit-adjusted")
                for shrinkage in (0.05, 0.1, 0.2, 0.3, 0.5)
            ),
        ]
        explore(elpv, elpv_config, args.explore_rounds, args.clients, candidates)
        return 0
    from server.server_run import server_cache_dir

    sections = []
    elpv_rows = sweep(
        elpv,
        elpv_config,
        args.rounds,
        args.clients,
        centralised_logistic(elpv, 42, server_cache_dir(elpv_config) / "reference"),
    )
    sections.append(("ELPV (4 classes, 1,968 images in 8 views, 656 held out)", elpv_rows))
    with tempfile.TemporaryDirectory(prefix="edgesplit-fed3r-") as work:
        generated, generated_config = generated_pool(Path(work), HARD_CONTRAST)
        logistic = centralised_logistic(generated, 42, Path(work) / "reference")
        sections.append(
            (
                f"generated 10-class set, gratings at contrast {HARD_CONTRAST:g} "
                f"({10 * GENERATED_PER_CLASS:,} images, {10 * GENERATED_HELD_OUT} held out)",
                sweep(generated, generated_config, args.rounds, args.clients, logistic),
            )
        )
    body = (
        textwrap.fill(
            "Command: `python -m simulations.fed3r_sweep`. In process over cached embeddings (x86-64 AMD EPYC with "
            "AVX-512 VNNI, 2 cores): the NumPy head trained as a board trains it, "
            f"Flower's FedAvg aggregation, {args.clients} clients all in every round, {args.rounds} rounds (the ELPV "
            "default run has 30), each client training on its whole share; server/head_init.py's Fed3R solve "
            "(lambda 30, bias unpenalised) and temperature calibration. Held-out accuracy, view-averaged for ELPV. "
            "'Fed3R (every example)' is the exact federated ridge; the 'floor 5' column is what a board shares by "
            "default (a class it holds fewer than 5 images of is left out of its sums). 'Local-prior correction': "
            "each client trains on logits + log(its class shares / the federation's), the prior from a counts-only "
            "query (random init) or Fed3R's counts. Fed3R+FT fine-tunes with the run's own settings (ELPV: 5 "
            "epochs a round at lr 0.01; the generated set: 1 epoch at lr 0.05); 'gentle' with one epoch a round "
            "at lr 0.003 and the correction; the learning rate's "
            "cosine spans the rounds run. LDA: the shrinkage LDA classifier (lda-shrinkage 0.1) that "
            "head-init='lda' solves from the same statistics as Fed3R (floor 5), no temperature. Centralised ridge: "
            "scikit-learn's RidgeClassifier on the pooled features the head sees, same lambda and views; logistic "
            "probe: deploy/reference_probe.py (identity views).",
            110,
        )
        + "\n\n"
    )
    for title, rows in sections:
        body += f"**{title}**\n\n{markdown_table(rows, COLUMNS)}\n\n"
    print(body)
    update_section(args.output, "Partition independence: Fed3R against random init and FedNCM", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
