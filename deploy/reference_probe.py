"""The experimenter's yardstick: a centralised logistic-regression probe on the very embeddings
the federated clients trained on, scored on the server's held-out split.

This reads every simulated client's data, which no party of a real federation can do. It lives
in simulations/ for that reason and is never called by the ServerApp or ClientApp.

The fit (a cross-validated grid of logistic regressions) takes minutes on 2 cores, and the
embeddings it reads are cached; so its result is cached too, keyed by a hash of exactly what it
was fitted on. A second ``make run`` on the same embeddings spends its time in the federation.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from client.edge_client import EdgeClient
from common.backbones import fingerprint, get_spec, load_backbone_weights, preprocess_for
from common.config import NodeConfig, RunConfig
from common.data import LabelledFiles
from common.embedding import Embedded, EmbeddingCache, embed_files
from common.engines import resolve_engine
from common.heads import PowerNorm
from common.metrics import classification_report
from server.run_folder import write_json_atomic
from server.server_run import backbone_variants, server_cache_dir, server_test_files

# The probe's regularisation grid (C of scikit-learn's LogisticRegression), chosen by 3-fold CV.
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float
    macro_f1: float
    regularisation_c: float
    train_examples: int
    test_examples: int


Embedder = Callable[..., Embedded]  # (files, cache folder, views=("identity",)) -> their embeddings


def run_embedder(config: RunConfig) -> Embedder:
    """Embeddings as the run computed them (its engine's variant of its backbone), read from the
    cache folder each is given (the caches the run filled) and computed only where missing."""
    spec = get_spec(config.backbone)
    preprocess = preprocess_for(config.backbone, config.image_size, config.crop_pct)
    state = load_backbone_weights(config.backbone, config.backbone_weights or None)
    fp = fingerprint(spec.name, state, preprocess)
    variants = backbone_variants(config, spec.name, state, preprocess, fp, server_test_files(config))
    engine = resolve_engine(config.engine)
    space = variants.variant_fingerprint(engine)

    def embed(files: LabelledFiles, cache_dir: Path, views: tuple[str, ...] = ("identity",)) -> Embedded:
        cache = EmbeddingCache(cache_dir / "embeddings", space)
        try:
            load = lambda: variants.engine(engine)  # noqa: E731  # only on a miss
            return embed_files(files, load, preprocess, cache, config.embed_batch_size, views=views)
        finally:
            cache.close()

    return embed


def centralised_probe(config: RunConfig, num_clients: int, c_grid: tuple[float, ...] = C_GRID) -> ProbeResult:
    """A probe on the union of the clients' training shares, with the head's input normalisation,
    on the features of the engine the run used (read from the caches the run filled); its L2
    strength C chosen from ``c_grid`` by cross-validation."""
    embed = run_embedder(config)
    test_files = server_test_files(config)
    features, labels = [], []
    for partition_id in range(num_clients):
        client = EdgeClient(config, NodeConfig(partition_id=partition_id, num_partitions=num_clients))
        embedded = embed(client.data.train, client.cache_dir)
        features.append(embedded.features[:, 0])  # the images as they are (the identity view)
        labels.append(embedded.labels)
    test = embed(test_files, server_cache_dir(config))
    train_x, train_y = np.concatenate(features), np.concatenate(labels)
    norm = PowerNorm()
    with torch.no_grad():
        normed_train = norm(torch.from_numpy(train_x).float()).numpy()
        normed_test = norm(torch.from_numpy(test.features[:, 0]).float()).numpy()
    num_classes = len(config.classes())
    return cached_fit(
        server_cache_dir(config) / "reference",
        normed_train,
        train_y,
        normed_test,
        test.labels,
        num_classes,
        config.seed,
        c_grid,
    )


def cached_fit(
    directory: Path,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    seed: int,
    c_grid: tuple[float, ...] = C_GRID,
) -> ProbeResult:
    """``_fit``'s result, from ``directory`` when these very arrays were fitted before."""
    import sklearn

    digest = hashlib.sha256(repr((num_classes, seed, c_grid, sklearn.__version__)).encode())
    for array in (train_x, train_y, test_x, test_y):
        array = np.ascontiguousarray(array)
        digest.update(repr((array.dtype.str, array.shape)).encode())
        digest.update(array.tobytes())
    path = directory / f"probe-{digest.hexdigest()[:32]}.json"
    if path.is_file():
        try:
            return ProbeResult(**json.loads(path.read_text()))
        except (ValueError, TypeError):  # unreadable or from another version: fit again
            pass
    result = _fit(train_x, train_y, test_x, test_y, num_classes, seed, c_grid)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, asdict(result))
    return result


def _fit(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    seed: int,
    c_grid: tuple[float, ...] = C_GRID,
) -> ProbeResult:
    """L2 logistic regression, C chosen by 3-fold cross-validation on the training set only
    (none with a single C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed) if np.bincount(train_y).min() >= 3 else 2
    best_c, best_score = 1.0, -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in c_grid if len(c_grid) > 1 else ():
            score = cross_val_score(LogisticRegression(C=c, max_iter=1000), train_x, train_y, cv=folds).mean()
            if score > best_score:
                best_c, best_score = c, score
        best_c = best_c if len(c_grid) > 1 else c_grid[0]
        model = LogisticRegression(C=best_c, max_iter=1000).fit(train_x, train_y)
    report = classification_report(test_y, model.predict(test_x), num_classes)
    return ProbeResult(report.accuracy, report.macro_f1, best_c, len(train_y), len(test_y))
