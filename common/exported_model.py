"""An exported model (``runs/<run-id>/model``) as a classifier, on ONNX Runtime alone: what
``edgesplit predict`` runs on a board and what the server scores its export with after a run.
No torch import on this path (NumPy, Pillow and ONNX Runtime only)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.engines import OnnxEngine, onnxruntime_available
from common.kinds import EngineName
from common.preprocess import DECODE_ERRORS, PreprocessSpec, decode_image
from common.protocol import MODEL_INFO, PROBABILITIES
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
FORM_OF_ENGINE: dict[str, str] = {EngineName.TORCH: "onnx", EngineName.ONNX: "onnx", EngineName.ONNX_INT8: "onnx-int8"}
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


def accuracy_of(
    model_dir: str | Path, files: Sequence[tuple[str, int | None]], batch_size: int = 8
) -> tuple[float, str]:
    """The exported model's accuracy on labelled files, in the form it was trained with: (accuracy, form)."""
    classifier = Classifier(model_dir)
    scored = [p for p in classifier.predict(files, batch_size) if p.predicted is not None and p.label is not None]
    return (float(np.mean([p.predicted == p.label for p in scored])) if scored else float("nan")), classifier.form
