"""Classification metrics as pure functions of (labels, probabilities): tested against hand-computed cases."""

from __future__ import annotations

from typing import Any

import numpy as np


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class precision/recall/F1, macro F1, ROC-AUC, confusion matrix.

    Args:
        y_true: (N,) integer labels.
        probs: (N, C) probabilities (rows sum to 1).
    ROC-AUC is binary AUC of the second class for two classes, macro one-vs-rest otherwise; None when
    a class is absent from y_true (AUC is undefined then, and we say so rather than invent a number).
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs):  # float32 softmax rows sum to 1 only within ~1e-7; sklearn checks
        probs = probs / probs.sum(1, keepdims=True)
    n_classes = len(classes)
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    labels = list(range(n_classes))
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels) if len(y_true) else np.zeros((n_classes, n_classes), int)
    p, r, f, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = np.unique(y_true)
    auc: float | None = None
    curves: dict[str, dict[str, list[float]]] = {}
    if len(present) == n_classes and n_classes >= 2:
        if n_classes == 2:
            auc = float(skm.roc_auc_score(y_true, probs[:, 1]))
        else:
            auc = float(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels))
        for i, c in enumerate(classes):
            fpr, tpr, _ = skm.roc_curve(y_true == i, probs[:, i])
            curves[c] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    # Recall averaged over the classes present: sklearn's balanced_accuracy_score.
    bal = float(np.mean([r[i] for i in present])) if len(present) else 0.0
    correct = int((y_pred == y_true).sum())
    return {
        "accuracy": correct / len(y_true) if len(y_true) else 0.0,
        "accuracy_95ci": list(accuracy_interval(correct, len(y_true))),  # Wilson: how far to trust it
        "balanced_accuracy": bal,
        "f1_macro": float(np.mean(f)) if n_classes else 0.0,
        "roc_auc": auc,
        "log_loss": float(skm.log_loss(y_true, _clipped(probs), labels=labels)) if len(y_true) else None,
        "n_images": int(len(y_true)),
        "classes": list(classes),
        "confusion_matrix": cm.tolist(),
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "roc_curves": curves,
    }


def accuracy_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for an accuracy of correct/n (95 % by default)."""
    if n == 0:
        return (0.0, 0.0)
    phat = correct / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return (float(centre - half), float(centre + half))


def _clipped(probs: np.ndarray) -> np.ndarray:
    """Probabilities kept off 0 (a log loss of saturated predictions stays finite) and summing to 1 again, in float64:
    scikit-learn warns on rows that do not (naive Bayes' probabilities are 0 or 1 to float32 precision)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1)
    return p / p.sum(1, keepdims=True)
