"""The centralised reference probe is fitted once per set of embeddings (a warm `make run`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deploy import reference_probe as reference


def _arrays(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_y, test_y = np.tile(np.arange(3), 10), np.tile(np.arange(3), 4)
    centres = rng.normal(size=(3, 8))
    return centres[train_y] + rng.normal(size=(30, 8)), train_y, centres[test_y] + rng.normal(size=(12, 8)), test_y


def test_the_probe_is_fitted_again_only_when_its_embeddings_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fits = []
    real_fit = reference._fit
    monkeypatch.setattr(reference, "_fit", lambda *args: fits.append(args) or real_fit(*args))

    first = reference.cached_fit(tmp_path, *_arrays(0), 3, seed=0)
    again = reference.cached_fit(tmp_path, *_arrays(0), 3, seed=0)
    assert again == first and len(fits) == 1  # the same embeddings: read back, not refitted

    train_x, train_y, test_x, test_y = _arrays(0)
    train_x[0, 0] += 1e-3  # one feature of one image changed
    reference.cached_fit(tmp_path, train_x, train_y, test_x, test_y, 3, seed=0)
    reference.cached_fit(tmp_path, *_arrays(0), 3, seed=1)  # another seed: another CV split
    assert len(fits) == 3
    assert 0.0 <= first.accuracy <= 1.0 and first.train_examples == 30 and first.test_examples == 12

    for path in tmp_path.glob("probe-*.json"):  # a damaged cache entry is refitted, not trusted
        path.write_text("{not json")
    assert reference.cached_fit(tmp_path, *_arrays(0), 3, seed=0) == first and len(fits) == 4


def test_the_exported_model_is_scored_again_only_when_it_or_the_images_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import common.exported_model
    from server import outcome

    scored: list[str] = []
    monkeypatch.setattr(
        common.exported_model, "accuracy_of", lambda model_dir, files: scored.append("x") or (0.75, "onnx")
    )
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text("{}")
    (model / "model-int8.onnx").write_bytes(b"int8 model")
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    cache = tmp_path / "cache" / "export-checks"

    assert outcome._scored(model, [(str(image), 0)], cache) == (0.75, "onnx")
    assert outcome._scored(model, [(str(image), 0)], cache) == (0.75, "onnx")
    assert len(scored) == 1  # the same model and images: remembered
    (model / "model-int8.onnx").write_bytes(b"another int8 model")
    outcome._scored(model, [(str(image), 0)], cache)
    outcome._scored(model, [(str(image), 1)], cache)  # another label
    assert len(scored) == 3
