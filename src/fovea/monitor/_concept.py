"""Concept drift: once people send the true labels (feedback), is the model still as right as it was?

Per window of predictions that have feedback: accuracy and expected calibration error, compared with the
validation figures recorded in the artifact. The change test is a one-sided exact binomial test of the
window's correct answers against the validation accuracy (H1: lower).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


@dataclass
class ConceptResult:
    n: int
    accuracy: float
    reference_accuracy: float
    ece: float
    reference_ece: float | None
    p_value: float  # P(this many or fewer correct | the validation accuracy still holds)
    drift: bool
    alpha: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def concept_drift(confidence: np.ndarray, correct: np.ndarray, reference_accuracy: float,
                  reference_ece: float | None = None, alpha: float = 0.05) -> ConceptResult:
    from scipy.stats import binomtest

    n, k = len(correct), int(np.sum(correct))
    if n == 0:
        raise ValueError("no predictions with feedback in this window")
    p = float(binomtest(k, n, min(max(reference_accuracy, 1e-9), 1 - 1e-9), alternative="less").pvalue)
    return ConceptResult(n, k / n, reference_accuracy, expected_calibration_error(np.asarray(confidence),
                                                                                  np.asarray(correct, float)),
                         reference_ece, p, p < alpha, alpha)
