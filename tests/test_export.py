"""The deployable model: backbone + trained head as ONNX (fp32, int8) and TorchScript, and
``edgesplit predict`` classifying a labelled folder with ONNX Runtime alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from common.engines import OnnxEngine
from common.export import DeployableModel, export_model
from common.heads import Head, make_head, train_head
from tests.conftest import REPO_ROOT, RealLite0


@pytest.fixture(scope="module")
def exported(real_lite0: RealLite0, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DeployableModel]:
    """A head trained on the real images' features (so predictions differ between images), exported."""
    with torch.inference_mode():
        features = real_lite0.torch_model(torch.from_numpy(real_lite0.images)).numpy()
    head: Head = make_head("linear", 1280, 4, seed=0)
    labels = np.asarray(real_lite0.files.labels)
    train_head(head, features[:, None], labels, epochs=30, learning_rate=0.05, batch_size=16, weight_decay=0.0, seed=0)
    variants = real_lite0.variants
    directory = tmp_path_factory.mktemp("export") / "model"
    info = {
        "classes": list(real_lite0.files.class_names),
        "feature_dim": 1280,
        "preprocess": asdict(variants.preprocess),
        "backbone": {"name": variants.name, "fingerprint": variants.fingerprint},
    }
    export_model(
        directory,
        real_lite0.torch_model,
        head,
        {engine: variants.path(engine) for engine in ("onnx", "onnx-int8")},
        info,
    )
    return directory, DeployableModel(real_lite0.torch_model, head).eval()


def _torch_outputs(model: DeployableModel, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        logits, probabilities = model(torch.from_numpy(images))
    return logits.numpy(), probabilities.numpy()


def test_exported_forms_agree_with_pytorch(exported: tuple[Path, DeployableModel], real_lite0: RealLite0) -> None:
    directory, model = exported
    logits, probabilities = _torch_outputs(model, real_lite0.images)
    assert len(set(logits.argmax(1))) > 1  # a head that says one class would make agreement trivial

    onnx_logits, onnx_probabilities = OnnxEngine(directory / "model.onnx").run(real_lite0.images)
    assert (onnx_logits.argmax(1) == logits.argmax(1)).mean() >= 0.99
    np.testing.assert_allclose(onnx_probabilities, probabilities, atol=1e-4)

    int8_logits, _ = OnnxEngine(directory / "model-int8.onnx").run(real_lite0.images)
    assert (int8_logits.argmax(1) == logits.argmax(1)).mean() >= 0.9

    scripted = torch.jit.load(str(directory / "model.ts"))
    with torch.inference_mode():
        script_logits, _ = scripted(torch.from_numpy(real_lite0.images[:8]))
    np.testing.assert_allclose(script_logits.numpy(), logits[:8], atol=1e-4)

    info = json.loads((directory / "model.json").read_text())
    assert info["classes"] == ["p0", "p1/3", "p2/3", "p1"]
    assert info["files"] == {"onnx": "model.onnx", "onnx-int8": "model-int8.onnx", "torchscript": "model.ts"}
    assert info["preprocess"]["image_size"] == 224 and info["input"]["name"] == "images"


PREDICT_WITHOUT_TORCH = """
import json, sys
sys.modules["torch"] = None  # any `import torch` on this path fails
from common.cli import main
code = main(sys.argv[1:])
loaded = sorted(name for name, module in sys.modules.items() if module is not None and name.split(".")[0] == "torch")
print(json.dumps({"code": code, "torch_modules": loaded}), file=sys.stderr)
sys.exit(code)
"""


def _predict(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PREDICT_WITHOUT_TORCH, "predict", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_predict_classifies_a_labelled_folder_without_torch(
    exported: tuple[Path, DeployableModel], real_lite0: RealLite0, tmp_path: Path
) -> None:
    directory, model = exported
    classes = real_lite0.files.class_names
    folder = tmp_path / "images"
    expected: dict[str, str] = {}
    torch_top1 = _torch_outputs(model, real_lite0.images)[0].argmax(1)
    for index, (path, label) in enumerate(zip(real_lite0.files.paths, real_lite0.files.labels, strict=True)):
        relative = f"{classes[label].replace('/', '_')}/{index:03d}.png"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / relative)
        expected[relative] = classes[torch_top1[index]]
    (folder / "p0" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    result = _predict(str(directory.parent), str(folder))  # the run folder works as well as model/

    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stderr.strip().splitlines()[-1]) == {"code": 0, "torch_modules": []}
    lines = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    predicted = {fields[0]: fields[1] for fields in lines if fields[1] != "SKIPPED"}
    assert set(predicted) == set(expected)
    agree = sum(predicted[name] == expected[name] for name in expected) / len(expected)
    assert agree >= 0.99
    assert [fields[0] for fields in lines if fields[1] == "SKIPPED"] == ["p0/corrupt.png"]
    for fields in lines:
        if fields[1] != "SKIPPED":
            assert 0.0 < float(fields[2]) <= 1.0
            assert fields[3] == "ok" or fields[3].startswith("WRONG, is ")
    assert "64 images classified (fp32" in result.stdout and "1 skipped" in result.stdout
    assert "accuracy" in result.stdout and "on 64 labelled images" in result.stdout
    matrix_rows = result.stdout.split("confusion matrix")[1].strip().splitlines()[2:]  # after the two headers
    assert [row.split()[0] for row in matrix_rows] == list(classes)
    assert sum(int(n) for row in matrix_rows for n in row.split()[1:]) == 64


def test_predict_with_int8_and_an_unlabelled_folder(exported: tuple[Path, DeployableModel], tmp_path: Path) -> None:
    directory, _ = exported
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for index in range(3):
        shutil.copyfile(REPO_ROOT / "tests" / "__init__.py", folder / f"not-an-image-{index}.txt")
    from tests.conftest import write_png

    write_png(folder / "a.png", seed=0, size=64)
    write_png(folder / "nested" / "b.jpg.png", seed=1, size=64)
    result = _predict(str(directory), str(folder), "--int8")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    assert [fields[0] for fields in lines] == ["a.png", "nested/b.jpg.png"]
    assert all(len(fields) == 3 for fields in lines)  # no truth column without class folders
    assert "2 images classified (int8" in result.stdout and "accuracy" not in result.stdout


def test_predict_explains_a_wrong_model_folder(tmp_path: Path) -> None:
    result = _predict(str(tmp_path), str(tmp_path))
    assert result.returncode == 2
    assert "holds no model.json" in result.stderr and "runs/<run-id>/model" in result.stderr


def test_predict_runs_the_numerics_the_head_was_trained_with(
    exported: tuple[Path, DeployableModel], tmp_path: Path
) -> None:
    """model.json's trained_with picks the default form; --fp32 / --int8 still choose, and say so."""
    from common.exported_model import Classifier

    directory, _ = exported
    assert Classifier(directory).form == "onnx"  # exported without trained_with: fp32, as before
    trained = tmp_path / "model"
    trained.mkdir()
    for source in directory.iterdir():
        (trained / source.name).symlink_to(source)
    info = json.loads((directory / "model.json").read_text())
    (trained / "model.json").unlink()
    (trained / "model.json").write_text(json.dumps({**info, "trained_with": {"engine": "onnx-int8", "variant": "x"}}))
    default = Classifier(trained)
    assert (default.form, default.as_trained) == ("onnx-int8", True)
    fp32 = Classifier(trained, form="onnx")
    assert (fp32.form, fp32.as_trained) == ("onnx", False)
    assert Classifier(trained, int8=True).form == "onnx-int8"
    folder = tmp_path / "images"
    from tests.conftest import write_png

    write_png(folder / "a.png", seed=0, size=64)
    assert "(int8, as trained" in _predict(str(trained), str(folder)).stdout
    assert "(fp32, NOT as the head was trained" in _predict(str(trained), str(folder), "--fp32").stdout
