"""Run the frozen backbone once per image and cache the result on disk.

The cache key is the image's content hash (and the view, see common/views.py) inside a database
named by the embedding space: the backbone variant, which already covers weights and
preprocessing, and the cut (common/split.py). A renamed or copied image is still a cache hit; an
edited image is not.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.data import LabelledFiles
from common.engines import Engine
from common.preprocess import DECODE_ERRORS, PreprocessSpec, UnusableImage, decode_image
from common.private_files import private_file, private_folder
from common.views import apply_view

log = logging.getLogger(__name__)


class EmbeddingCache:
    """Content-addressed embeddings of one embedding space, in one SQLite file, as float16.

    float16 halves the disk and memory of feature maps cached at a later cut (for
    EfficientNet-Lite0 at cut 1: 7x7x320 values per image and view) and, for the backbone's
    post-activation features, changes a head's accuracy by far less than run-to-run noise.
    """

    def __init__(self, directory: str | Path, space_id: str) -> None:
        directory = private_folder(Path(directory))
        # 0600 before SQLite opens it: its journal files take the database's mode
        self.path = private_file(directory / f"{space_id[:32]}.sqlite")
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, shape TEXT NOT NULL, vec BLOB NOT NULL)"
        )
        self._db.commit()

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        keys = list(dict.fromkeys(keys))
        for start in range(0, len(keys), 500):  # SQLite limits bound parameters per query
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT key, shape, vec FROM features WHERE key IN ({marks})"
            for key, shape, blob in self._db.execute(query, chunk):
                found[key] = np.frombuffer(blob, dtype=np.float16).reshape(tuple(map(int, shape.split("x"))))
        return found

    def present(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` the cache holds, without reading their features."""
        found: set[str] = set()
        keys = list(dict.fromkeys(keys))
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            query = f"SELECT key FROM features WHERE key IN ({','.join('?' * len(chunk))})"
            found.update(key for (key,) in self._db.execute(query, chunk))
        return found

    def put_many(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        rows = []
        for key, value in items:
            array = np.ascontiguousarray(value, dtype=np.float16)
            rows.append((key, "x".join(map(str, array.shape)), array.tobytes()))
        self._db.executemany("INSERT OR REPLACE INTO features (key, shape, vec) VALUES (?, ?, ?)", rows)
        self._db.commit()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def close(self) -> None:
        self._db.close()


@dataclass
class EmbedStats:
    """What the embedding step did: counts a client reports and a summary shows."""

    computed: int = 0  # images with at least one view computed in this call
    cached: int = 0  # images with every view read from the cache
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0

    @property
    def skipped(self) -> Counter[str]:
        """Skipped files counted by reason."""
        return Counter(reason for _, reason in self.skipped_files)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)


@dataclass
class Embedded:
    features: np.ndarray  # (n, views, *feature shape) float16: pooled vectors, or maps at a later cut
    labels: np.ndarray  # (n,) int64
    stats: EmbedStats
    positions: np.ndarray  # (n,) each row's index in the input files (skipped files have none)

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of the rows that came from input files ``start`` to ``stop - 1``:
        views of this object's arrays, not copies (rows are in file order)."""
        first, last = np.searchsorted(self.positions, (start, stop))
        return self.features[first:last], self.labels[first:last]


def view_key(image_key: str, view: str) -> str:
    """The cache key of one view of one image (the identity view is the image's own key)."""
    return image_key if view == "identity" else f"{image_key}:{view}"


def embed_files(
    files: LabelledFiles,
    load_engine: Callable[[], Engine],
    preprocess: PreprocessSpec,
    cache: EmbeddingCache,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    who: str = "embed",
    views: tuple[str, ...] = ("identity",),
) -> Embedded:
    """Embeddings of every view of every decodable file, from the cache where possible.

    Files that cannot be read or decoded are skipped and counted by reason, with the files the
    folder scan already set aside (``files.skipped``), in one warning for the whole call; the
    rest go on. ``load_engine`` is called only if some view is not in the cache. Each image is
    decoded once for all its views. Memory stays bounded by one backbone batch (``batch_size``
    inputs, at least one image's views) plus the result: each batch goes to the cache as it is
    computed, and the result is read back into one preallocated array.
    """
    started = time.perf_counter()
    stats = EmbedStats(skipped_files=list(files.skipped))
    keys = _content_keys(files, stats)  # "" marks an unreadable file
    held = cache.present(view_key(k, v) for k in keys if k for v in views)
    missing = {i: [v for v in views if view_key(k, v) not in held] for i, k in enumerate(keys) if k}
    to_compute = [i for i, views_missing in missing.items() if views_missing]
    stats.cached = len(missing) - len(to_compute)

    engine: Engine | None = None
    first_bad: list[str] = []
    images_per_batch = max(1, batch_size // len(views))
    for start in range(0, len(to_compute), images_per_batch):
        batch = to_compute[start : start + images_per_batch]
        batch_keys, inputs = _decode_views(files, keys, batch, missing, preprocess, stats, first_bad)
        if inputs:
            engine = engine or load_engine()
            outputs = np.asarray(engine(np.stack(inputs)), dtype=np.float16)
            cache.put_many(zip(batch_keys, outputs, strict=True))
            held.update(batch_keys)
        if progress is not None:
            progress(start + len(batch), len(to_compute))
    if stats.num_skipped:
        log.warning(
            "%s: skipped %d of %d images (%s); first: %s",
            who,
            stats.num_skipped,
            len(files) + len(files.skipped),
            dict(stats.skipped),
            first_bad[0] if first_bad else stats.skipped_files[0][0],
        )
    embedded = _assemble(files, keys, cache, held, views, stats)
    stats.seconds = time.perf_counter() - started
    return embedded


def _content_keys(files: LabelledFiles, stats: EmbedStats) -> list[str]:
    """Each file's content hash ("" for an unreadable file, counted as skipped). Hashing first
    keeps memory bounded by one batch of decoded images."""
    keys = []
    for path in files.paths:
        try:
            keys.append(_file_sha256(path))
        except OSError as error:
            keys.append("")
            stats.skipped_files.append((path, f"unreadable ({type(error).__name__})"))
    return keys


def _decode_views(
    files: LabelledFiles,
    keys: list[str],
    batch: list[int],
    missing: dict[int, list[str]],
    preprocess: PreprocessSpec,
    stats: EmbedStats,
    first_bad: list[str],
) -> tuple[list[str], list[np.ndarray]]:
    """The backbone inputs of the views a batch of files still lacks, with their cache keys; each
    image is decoded once for all its views, and an undecodable one is skipped and counted."""
    batch_keys, inputs = [], []
    for i in batch:
        try:
            image = preprocess(decode_image(Path(files.paths[i]).read_bytes()))
        except DECODE_ERRORS as error:
            reason = error.reason if isinstance(error, UnusableImage) else f"unreadable ({type(error).__name__})"
            stats.skipped_files.append((files.paths[i], reason))
            first_bad.append(f"{files.paths[i]}: {error}")
            continue
        for view in missing[i]:
            inputs.append(apply_view(view, image))
            batch_keys.append(view_key(keys[i], view))
        stats.computed += 1
    return batch_keys, inputs


def _assemble(
    files: LabelledFiles,
    keys: list[str],
    cache: EmbeddingCache,
    held: set[str],
    views: tuple[str, ...],
    stats: EmbedStats,
    chunk: int = 256,
) -> Embedded:
    """The features of every file whose views are all known, in file order, read from the cache
    a chunk at a time into one array (never a second copy of the whole)."""
    kept = [i for i, k in enumerate(keys) if k and all(view_key(k, v) in held for v in views)]
    labels = np.asarray([files.labels[i] for i in kept], dtype=np.int64)
    features: np.ndarray | None = None
    for start in range(0, len(kept), chunk):
        rows = kept[start : start + chunk]
        found = cache.get_many(view_key(keys[i], v) for i in rows for v in views)
        for offset, i in enumerate(rows, start):
            for column, view in enumerate(views):
                value = found[view_key(keys[i], view)]
                if features is None:
                    features = np.empty((len(kept), len(views), *value.shape), dtype=np.float16)
                features[offset, column] = value
    if features is None:
        features = np.zeros((0, len(views), 0), dtype=np.float16)
    return Embedded(features, labels, stats, np.asarray(kept, dtype=np.int64))


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def progress_logger(who: str, every_seconds: float = 5.0) -> Callable[[int, int], None]:
    """A progress callback that logs a line at most every few seconds, and at the end."""
    last = [0.0]
    started = time.perf_counter()

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] >= every_seconds:
            last[0] = now
            rate = done / max(now - started, 1e-9)
            log.info("%s: embedded %d/%d images (%.1f img/s)", who, done, total, rate)

    return report
