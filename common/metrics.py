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
    balanced_accuracy: float  # mean recall over the classes present: what a rare class's misses cost
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
    figures comparable between runs. Balanced accuracy averages recall over the classes that have
    true samples only (scikit-learn's ``balanced_accuracy_score``).
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
        balanced_accuracy=float(recall[actual > 0].mean()) if total else 0.0,
        per_class_recall=[float(r) for r in recall],
        confusion_matrix=matrix.tolist(),
        loss=float(loss),
        num_examples=total,
    )


@dataclass(frozen=True)
class OperatingPoint:
    """One detector read off scores: "positive" when the score is at least ``threshold``."""

    target_precision: float
    threshold: float  # nan: no threshold reaches the target precision
    precision: float
    recall: float
    positives: int  # true positives in the evaluated set


def precision_recall_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, threshold) of "positive if score >= threshold", for every distinct
    score from the highest down (ties enter together). Recall is 0 where there are no positives."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    sorted_scores, hits = np.asarray(scores, dtype=np.float64)[order], np.asarray(positive, dtype=bool)[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), len(sorted_scores) - 1]
    true_positive = np.cumsum(hits)[last_of_tie].astype(np.float64)
    flagged = (last_of_tie + 1).astype(np.float64)
    total = float(hits.sum())
    recall = true_positive / total if total else np.zeros_like(true_positive)
    return true_positive / flagged, recall, sorted_scores[last_of_tie]


def recall_at_precision(positive: np.ndarray, scores: np.ndarray, target_precision: float) -> OperatingPoint:
    """The highest recall of a threshold on ``scores`` whose precision is at least
    ``target_precision`` (the lowest such threshold): the operating point an inspector picks."""
    precision, recall, thresholds = precision_recall_curve(positive, scores)
    reaching = np.flatnonzero(precision >= target_precision)
    positives = int(np.asarray(positive, dtype=bool).sum())
    if len(reaching) == 0 or positives == 0:
        return OperatingPoint(target_precision, float("nan"), float("nan"), 0.0, positives)
    best = reaching[np.argmax(recall[reaching])]
    return OperatingPoint(
        target_precision, float(thresholds[best]), float(precision[best]), float(recall[best]), positives
    )
