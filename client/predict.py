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
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from common.data import IMAGE_EXTENSIONS
from common.engines import EngineError
from common.exported_model import FORM_NAMES, Classifier, PredictError
from common.metrics import classification_report


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
