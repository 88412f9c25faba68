"""What a board writes about its data and its engine is its user's alone: the embedding cache, the
backbone variants, the golden batch and verdicts, and personal heads are files 0600 in folders
0700, under the usual umask 022, and a cache left 0644 by an older version is closed on next use."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from client.backbone_cache import BackboneCache
from client.edge_client import EdgeClient, EmbeddedData
from client.lru import LruCache
from common.config import NodeConfig, RunConfig
from common.embedding import EmbeddingCache, EmbedStats
from common.engines import ENGINE_KINDS
from common.protocol import ONNX_MODEL, GoldenBatch
from common.trainable import make_trainable
from tests.protocol_samples import instructions

FP = "ab" * 32


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """A board's usual umask, which alone would leave files 0644 and folders 0755."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _modes(root: Path) -> dict[str, int]:
    """Every file and folder under ``root`` (itself excluded) with its permission bits."""
    return {str(path.relative_to(root)): _mode(path) for path in root.rglob("*")}


def _tiny_onnx() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_backbone_variants_golden_batches_and_verdicts_are_private(tmp_path: Path) -> None:
    # Prepare
    kind, model = ENGINE_KINDS["onnx"], _tiny_onnx()
    onnx.checker.check_model(onnx.load_from_string(model))
    variant = kind.variant_fingerprint(FP, model)
    cache = BackboneCache(tmp_path / "cache", LruCache(4), LruCache(4))
    images = np.random.default_rng(0).normal(0, 1, (2, 3, 4, 4)).astype(np.float16)
    golden = GoldenBatch(images=images, features=images.astype(np.float32).mean(axis=(2, 3)))

    # Execute
    cache.keep(
        kind, {ONNX_MODEL: np.frombuffer(model, np.uint8)}, instructions(engine="onnx", engine_fingerprint=variant)
    )
    cache.keep_golden(golden, FP)
    cosine = cache.golden_cosine(kind, FP, variant)

    # Assert
    assert cosine is not None and cosine > 0.999  # the verdict was measured, and kept
    modes = _modes(tmp_path / "cache")
    assert modes == {
        "backbones": 0o700,
        f"backbones/{FP}.onnx.onnx": 0o600,
        f"backbones/{FP}.onnx.onnx.golden.json": 0o600,
        f"backbones/{FP}.golden.npz": 0o600,
    }
    assert _mode(tmp_path / "cache") == 0o700  # made by the cache, so its own


def test_the_embedding_cache_is_private_and_an_old_open_one_is_closed(tmp_path: Path) -> None:
    # Prepare: a cache an older version left readable by all
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    (old / ("f" * 32 + ".sqlite")).touch(mode=0o644)

    # Execute
    for directory in (tmp_path / "new" / "embeddings", old):
        cache = EmbeddingCache(directory, "f" * 64)
        cache.put_many([("key", np.ones(3))])
        cache.close()

    # Assert
    assert _modes(tmp_path / "new") == {"embeddings": 0o700, f"embeddings/{'f' * 32}.sqlite": 0o600}
    assert _mode(old) == 0o700 and _modes(old) == {f"{'f' * 32}.sqlite": 0o600}


def test_a_personal_head_is_private(tmp_path: Path) -> None:
    # Prepare
    client = EdgeClient(RunConfig(), NodeConfig(cache_dir=str(tmp_path / "cache")))
    head = make_trainable("efficientnet_lite0", 0, "linear", 2, seed=0)
    features = np.random.default_rng(0).normal(0, 1, (8, 1, 1280)).astype(np.float16)
    labels = np.arange(8) % 2
    data = EmbeddedData(features, labels, features, labels, EmbedStats())

    # Execute
    client.personalise(head, data, instructions(fingerprint=FP, personal_epochs=1))

    # Assert
    assert _modes(tmp_path / "cache") == {"personal": 0o700, f"personal/{FP[:16]}-cut0.npz": 0o600}
