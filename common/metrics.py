"""Classification metrics computed from a confusion matrix, with no hidden averaging choices."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ClassificationReport:
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    per_class_recall: list[float]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    loss: float
    num_examples: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def classification_report(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, loss: float = float("nan")
) -> ClassificationReport:
    """Accuracy and macro precision / recall / F1 over all ``num_classes`` classes.

    A class with no true samples (or no predictions) contributes 0 to the macro mean of the
    undefined quantity, as scikit-learn does with ``zero_division=0``; that keeps the macro
    figures comparable between runs.
    """
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    true_positive = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    actual = matrix.sum(axis=1).astype(np.float64)
    precision = np.divide(true_positive, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros(num_classes), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(num_classes), where=denominator > 0)
    total = int(matrix.sum())
    return ClassificationReport(
        accuracy=float(true_positive.sum() / total) if total else 0.0,
        macro_precision=float(precision.mean()),
        macro_recall=float(recall.mean()),
        macro_f1=float(f1.mean()),
        per_class_recall=[float(r) for r in recall],
        confusion_matrix=matrix.tolist(),
        loss=float(loss),
        num_examples=total,
    )
