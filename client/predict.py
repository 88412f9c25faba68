"""``edgesplit predict``: classify a folder of images with an exported model, on ONNX Runtime alone.

No torch import anywhere on this path (NumPy, Pillow and ONNX Runtime only), so it runs on a board
with the smallest install. A labelled folder (one sub-folder per class, named as in the model's
class list, with "/" written as "_") also gets accuracy and a confusion matrix.

By default the model runs the backbone numerics its head was trained with (``model.json``'s
``trained_with``: the int8 model for a run whose features were int8), so that it scores what the
run reported; ``--fp32`` or ``--int8`` choose a form explicitly.

    edgesplit predict runs/<run>/model path/to/images [--fp32 | --int8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from common.data import IMAGE_EXTENSIONS
from common.engines import MODEL_INFO, PROBABILITIES, EngineError, OnnxEngine, onnxruntime_available
from common.metrics import classification_report
from common.preprocess import DECODE_ERRORS, PreprocessSpec, decode_image
from common.views import apply_view


class PredictError(ValueError):
    """The model folder or the image folder is not usable; the message says how to fix it."""


@dataclass(frozen=True)
class Prediction:
    path: str
    label: int | None  # true class index, when the folder is labelled
    predicted: int | None  # None: the image could not be read
    probability: float
    problem: str = ""


# The ONNX form of an exported model that runs each backbone engine's numerics (torch: fp32).
FORM_OF_ENGINE = {"torch": "onnx", "onnx": "onnx", "onnx-int8": "onnx-int8"}
FORM_NAMES = {"onnx": "fp32", "onnx-int8": "int8"}


class Classifier:
    """An exported model: its ONNX session, class names and preprocessing.

    ``form``: "onnx" (fp32) or "onnx-int8"; by default the one the head was trained with
    (``model.json``'s ``trained_with``; fp32 for a model exported without it). ``int8=True`` is
    ``form="onnx-int8"``."""

    def __init__(
        self, model_dir: str | Path, int8: bool = False, num_threads: int = 0, form: str | None = None
    ) -> None:
        directory = Path(model_dir).expanduser()
        if (directory / "model" / MODEL_INFO).is_file():  # a run folder was given
            directory = directory / "model"
        info_path = directory / MODEL_INFO
        if not info_path.is_file():
            raise PredictError(
                f"{str(directory)!r} holds no {MODEL_INFO}. Point at the model folder a run exported "
                "(runs/<run-id>/model) or at the run folder itself."
            )
        self.info: dict[str, Any] = json.loads(info_path.read_text())
        trained = FORM_OF_ENGINE.get(str(self.info.get("trained_with", {}).get("engine", "")), "onnx")
        form = "onnx-int8" if int8 else form or trained
        if form not in FORM_NAMES:
            raise PredictError(f"Unknown model form {form!r}; choose one of {sorted(FORM_NAMES)}.")
        self.form, self.as_trained = form, form == trained
        model_path = directory / self.info["files"].get(form, "")
        if not model_path.is_file():
            raise PredictError(f"The model folder lacks the {form} model ({model_path.name}); export the run again.")
        if not onnxruntime_available():
            raise PredictError("edgesplit predict needs ONNX Runtime: pip install 'edgesplit[edge]'.")
        self.engine = OnnxEngine(model_path, num_threads)
        self.classes: list[str] = list(self.info["classes"])
        self.preprocess = PreprocessSpec.from_json(json.dumps(self.info["preprocess"]))
        # A run that scored its models on the mean prediction over views does the same here.
        self.views: list[str] = list(self.info.get("views", ["identity"]))

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        outputs = dict(zip(self.engine.output_names, self.engine.run(batch), strict=True))
        return np.asarray(outputs[PROBABILITIES], dtype=np.float32)

    def predict(self, files: Sequence[tuple[str, int | None]], batch_size: int = 8) -> Iterator[Prediction]:
        """Predictions in input order; an unreadable image yields a Prediction with its problem."""
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            images: list[np.ndarray] = []
            kept, failed = [], {}
            for index, (path, _) in enumerate(chunk):
                try:
                    image = self.preprocess(decode_image(Path(path).read_bytes()))
                except DECODE_ERRORS as error:
                    failed[index] = f"{type(error).__name__}: {error}"
                    continue
                images.extend(apply_view(view, image) for view in self.views)
                kept.append(index)
            scores = (
                self.probabilities(np.stack(images)).reshape(len(kept), len(self.views), -1).mean(1)
                if images
                else np.zeros((0, len(self.classes)))
            )
            by_index = dict(zip(kept, scores, strict=True))
            for index, (path, label) in enumerate(chunk):
                if index in failed:
                    yield Prediction(path, label, None, 0.0, failed[index])
                else:
                    row = by_index[index]
                    yield Prediction(path, label, int(row.argmax()), float(row.max()))


def list_images(folder: str | Path, classes: Sequence[str]) -> tuple[list[tuple[str, int | None]], bool]:
    """(path, label) pairs and whether the folder is labelled (has a sub-folder per some class)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise PredictError(f"Image folder {str(root)!r} does not exist.")
    by_folder = {name.replace("/", "_"): index for index, name in enumerate(classes)}
    by_folder.update({name: index for index, name in enumerate(classes)})
    labelled = any((root / name).is_dir() for name in by_folder)
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise PredictError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}.")
    files: list[tuple[str, int | None]] = []
    for path in images:
        top = path.relative_to(root).parts[0] if len(path.relative_to(root).parts) > 1 else ""
        files.append((str(path), by_folder.get(top) if labelled else None))
    return files, labelled


def format_confusion(matrix: list[list[int]], classes: Sequence[str]) -> str:
    """Rows: true class; columns: predicted class; names on both."""
    width = max(7, *(len(name) for name in classes))
    corner = "true \\ predicted"
    header = f"{corner:>{width + 10}} " + " ".join(f"{name:>{width}}" for name in classes)
    rows = [
        f"{name:>{width + 10}} " + " ".join(f"{count:>{width}}" for count in row)
        for name, row in zip(classes, matrix, strict=True)
    ]
    return "\n".join([header, *rows])


def run(args: argparse.Namespace, out: TextIO) -> int:
    form = "onnx-int8" if args.int8 else "onnx" if args.fp32 else None
    classifier = Classifier(args.model, num_threads=args.threads, form=form)
    files, labelled = list_images(args.images, classifier.classes)
    root = Path(args.images).expanduser()
    started = time.perf_counter()
    truth, predicted, skipped = [], [], 0
    for item in classifier.predict(files, args.batch_size):
        shown = Path(item.path).relative_to(root)
        if item.predicted is None:
            skipped += 1
            print(f"{shown}\tSKIPPED\t-\t{item.problem}", file=out)
            continue
        line = f"{shown}\t{classifier.classes[item.predicted]}\t{item.probability:.3f}"
        if item.label is not None:
            truth.append(item.label)
            predicted.append(item.predicted)
            line += f"\t{'ok' if item.label == item.predicted else 'WRONG, is ' + classifier.classes[item.label]}"
        print(line, file=out)
    seconds = time.perf_counter() - started
    done = len(files) - skipped
    form = FORM_NAMES[classifier.form] + (", as trained" if classifier.as_trained else ", NOT as the head was trained")
    print(f"\n{done} images classified ({form}, {done / max(seconds, 1e-9):.1f} img/s), {skipped} skipped", file=out)
    if labelled and truth:
        report = classification_report(np.asarray(truth), np.asarray(predicted), len(classifier.classes))
        print(
            f"accuracy {report.accuracy:.4f} | macro-F1 {report.macro_f1:.4f} on {len(truth)} labelled images", file=out
        )
        print("confusion matrix (rows: true class, columns: predicted class)", file=out)
        print(format_confusion(report.confusion_matrix, classifier.classes), file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edgesplit predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="the exported model folder (runs/<run-id>/model) or the run folder")
    parser.add_argument("images", help="a folder of images; class sub-folders make it labelled")
    numerics = parser.add_mutually_exclusive_group()
    numerics.add_argument("--fp32", action="store_true", help="use the fp32 model (default: as the head was trained)")
    numerics.add_argument("--int8", action="store_true", help="use the int8 model (default: as the head was trained)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per inference (default 8)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per core)")
    args = parser.parse_args(argv)
    try:
        return run(args, sys.stdout)
    except (PredictError, EngineError) as error:
        print(f"edgesplit predict: {error}", file=sys.stderr)
        return 2


def accuracy_of(
    model_dir: str | Path, files: Sequence[tuple[str, int | None]], batch_size: int = 8
) -> tuple[float, str]:
    """The exported model's accuracy on labelled files, in the form it was trained with: (accuracy, form)."""
    classifier = Classifier(model_dir)
    scored = [p for p in classifier.predict(files, batch_size) if p.predicted is not None and p.label is not None]
    return (float(np.mean([p.predicted == p.label for p in scored])) if scored else float("nan")), classifier.form
