"""embed_files and EmbeddingCache with a tiny backbone: skipping bad files, caching by content."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.data import LabelledFiles
from common.embedding import EmbeddingCache, embed_files
from common.engines import Engine, TorchEngine
from common.preprocess import PreprocessSpec
from tests.conftest import write_png

SPACE = "f" * 64  # an embedding-space id (normally the backbone fingerprint)


class CountingBackbone(nn.Module):
    """A tiny frozen CNN: 3 -> 4 channels, pooled; counts the images it sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.images_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += x.shape[0]
        return self.net(x)


def engine_of(module: nn.Module) -> Callable[[], Engine]:
    return lambda: TorchEngine(module)


@pytest.fixture
def image_dir(tmp_path: Path) -> tuple[LabelledFiles, Path]:
    """Six good PNGs (labels 0,1,0,1,2,2) with three bad files between them."""
    images = tmp_path / "images"
    good = [write_png(images / f"good{i}.png", seed=i) for i in range(6)]
    corrupt = images / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(99).bytes(600))
    full = (images / "good0.png").read_bytes()
    truncated = images / "truncated.png"
    truncated.write_bytes(full[: len(full) // 2])
    empty = images / "empty.png"
    empty.write_bytes(b"")
    order = [good[0], corrupt, good[1], good[2], truncated, good[3], empty, good[4], good[5]]
    labels = [0, 9, 1, 0, 9, 1, 9, 2, 2]  # 9 marks the bad files: none may survive
    files = LabelledFiles(tuple(str(p) for p in order), tuple(labels), ("a", "b", "c"))
    return files, tmp_path / "cache"


PREPROCESS = PreprocessSpec(image_size=32)


def test_first_call_computes_good_images_and_skips_bad_ones(image_dir):
    # Prepare
    files, cache_dir = image_dir
    backbone = CountingBackbone()
    cache = EmbeddingCache(cache_dir, SPACE)

    # Execute
    result = embed_files(files, engine_of(backbone), PREPROCESS, cache, batch_size=4)

    # Assert
    assert result.features.shape == (6, 1, 4)  # (images, views, features)
    assert result.features.dtype == np.float16
    assert result.stats.computed == 6
    assert result.stats.cached == 0
    assert result.stats.num_skipped == 3
    assert sum(n for reason, n in result.stats.skipped.items() if reason.startswith("undecodable")) == 3
    assert result.stats.skipped["undecodable (UnidentifiedImageError)"] == 2  # random bytes, zero bytes
    assert result.stats.skipped["undecodable (OSError)"] == 1  # truncated PNG
    assert backbone.images_seen == 6
    assert len(cache) == 6
    cache.close()


def test_labels_align_with_features_after_skipping(image_dir):
    # Prepare
    files, cache_dir = image_dir
    backbone = CountingBackbone()
    cache = EmbeddingCache(cache_dir, SPACE)
    good = [i for i, y in enumerate(files.labels) if y != 9]

    # Execute
    result = embed_files(files, engine_of(backbone), PREPROCESS, cache, batch_size=4)

    # Assert: each row is that file's own embedding, with that file's label
    assert result.labels.tolist() == [0, 1, 0, 1, 2, 2]
    assert result.labels.dtype == np.int64
    gaps = [np.abs(result.features[i] - result.features[j]).max() for i in range(6) for j in range(i)]
    assert min(gaps) > 1e-3  # rows are distinguishable, so the comparison below checks order
    for row, index in enumerate(good):
        single = LabelledFiles((files.paths[index],), (files.labels[index],), files.class_names)
        alone = embed_files(
            single, engine_of(backbone), PREPROCESS, EmbeddingCache(cache_dir / "fresh", f"{index}" * 8)
        )
        np.testing.assert_array_equal(result.features[row], alone.features[0])
    cache.close()


def test_rows_select_by_input_position_despite_skipped_files(image_dir):
    # Prepare: the first half of the input is one share (say train), the rest another (test)
    files, cache_dir = image_dir
    good = [i for i, y in enumerate(files.labels) if y != 9]
    half = len(files) // 2

    # Execute
    result = embed_files(
        files, engine_of(CountingBackbone()), PREPROCESS, EmbeddingCache(cache_dir, SPACE), batch_size=4
    )
    first_x, first_y = result.rows(0, half)
    rest_x, rest_y = result.rows(half, len(files))

    # Assert: positions are the input indices of the kept files, and the shares split there
    assert result.positions.tolist() == good
    assert first_y.tolist() == [files.labels[i] for i in good if i < half]
    assert rest_y.tolist() == [files.labels[i] for i in good if i >= half]
    np.testing.assert_array_equal(np.concatenate([first_x, rest_x]), result.features)
    # the shares are views of the one features array: a client holds its embeddings once
    assert first_x.base is result.features and rest_x.base is result.features


def test_second_call_reads_everything_from_the_cache(image_dir):
    # Prepare
    files, cache_dir = image_dir
    first_cache = EmbeddingCache(cache_dir, SPACE)
    first = embed_files(files, engine_of(CountingBackbone()), PREPROCESS, first_cache, batch_size=4)
    first_cache.close()
    backbone = CountingBackbone()

    # Execute: a new cache object on the same directory, as a new process would open it
    second_cache = EmbeddingCache(cache_dir, SPACE)
    second = embed_files(files, engine_of(backbone), PREPROCESS, second_cache, batch_size=4)

    # Assert
    assert second.stats.computed == 0
    assert second.stats.cached == 6
    assert second.stats.num_skipped == 3  # bad files are not cached, they fail again
    assert backbone.images_seen == 0
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_array_equal(second.labels, first.labels)
    second_cache.close()


def test_a_copied_image_is_a_cache_hit_and_an_edited_one_is_not(image_dir):
    # Prepare
    files, cache_dir = image_dir
    cache = EmbeddingCache(cache_dir, SPACE)
    first = embed_files(files, engine_of(CountingBackbone()), PREPROCESS, cache)
    folder = Path(files.paths[0]).parent
    copy = shutil.copy(folder / "good3.png", folder / "renamed.png")
    edited = write_png(folder / "edited.png", seed=1000)
    more = LabelledFiles((str(copy), str(edited)), (1, 2), files.class_names)
    backbone = CountingBackbone()

    # Execute
    result = embed_files(more, engine_of(backbone), PREPROCESS, cache)

    # Assert
    assert result.stats.cached == 1
    assert result.stats.computed == 1
    assert backbone.images_seen == 1
    np.testing.assert_array_equal(result.features[0], first.features[3])  # good3 is the 4th good file
    cache.close()


def test_another_embedding_space_does_not_share_the_cache(image_dir):
    files, cache_dir = image_dir
    embed_files(files, engine_of(CountingBackbone()), PREPROCESS, EmbeddingCache(cache_dir, SPACE))

    other = embed_files(files, engine_of(CountingBackbone()), PREPROCESS, EmbeddingCache(cache_dir, "0" * 64))

    assert other.stats.cached == 0
    assert other.stats.computed == 6


def test_unreadable_path_is_skipped(tmp_path):
    # Prepare
    good = write_png(tmp_path / "good.png", seed=1)
    files = LabelledFiles((str(tmp_path / "missing.png"), str(good)), (0, 1), ("a", "b"))

    # Execute
    result = embed_files(files, engine_of(CountingBackbone()), PREPROCESS, EmbeddingCache(tmp_path / "cache", SPACE))

    # Assert
    assert result.labels.tolist() == [1]
    assert result.stats.skipped == {"unreadable (FileNotFoundError)": 1}


def test_progress_is_reported_per_batch(image_dir):
    files, cache_dir = image_dir
    calls: list[tuple[int, int]] = []

    embed_files(
        files,
        engine_of(CountingBackbone()),
        PREPROCESS,
        EmbeddingCache(cache_dir, SPACE),
        batch_size=4,
        progress=lambda done, total: calls.append((done, total)),
    )

    assert calls == [(4, 9), (8, 9), (9, 9)]  # 9 files to try, in batches of 4


def test_cache_round_trips_vectors(tmp_path):
    cache = EmbeddingCache(tmp_path, SPACE)
    vectors = {f"k{i}": np.arange(3, dtype=np.float32) + i for i in range(3)}

    cache.put_many(vectors.items())
    found = cache.get_many(["k0", "k2", "nope", "k0"])

    assert sorted(found) == ["k0", "k2"]
    np.testing.assert_array_equal(found["k2"], [2.0, 3.0, 4.0])
    assert len(cache) == 3
    assert cache.path.name == SPACE[:32] + ".sqlite"


def test_backbone_factory_is_called_once_and_only_on_a_cache_miss(image_dir):
    # Prepare
    files, cache_dir = image_dir
    built: list[CountingBackbone] = []

    def factory() -> Engine:
        built.append(CountingBackbone())
        return TorchEngine(built[-1])

    # Execute
    first = embed_files(files, factory, PREPROCESS, EmbeddingCache(cache_dir, SPACE), batch_size=2)
    builds_after_first = len(built)
    second = embed_files(files, factory, PREPROCESS, EmbeddingCache(cache_dir, SPACE), batch_size=2)

    # Assert
    assert builds_after_first == 1  # five batches, one model
    assert built[0].images_seen == 6
    assert first.stats.computed == 6
    assert len(built) == 1  # everything cached (and the bad files fail before the model): never built
    assert second.stats.cached == 6
    np.testing.assert_array_equal(second.features, first.features)
