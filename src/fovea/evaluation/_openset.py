"""Open-set figures: how well a model's unknown score tells its own classes from images of none of them.

Pure functions of scores. Known images kept (score at or under the threshold) and their accuracy; for each set
of unknown images, the ROC-AUC of the score (known against unknown: 0.5 is chance) and the share of unknowns
accepted at the model's threshold (the false-positive rate at the keep rate it was calibrated for).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """ROC-AUC of the score as a detector of unknown images (higher score: more likely unknown)."""
    from sklearn.metrics import roc_auc_score

    y = np.concatenate([np.zeros(len(known)), np.ones(len(unknown))])
    return float(roc_auc_score(y, np.concatenate([known, unknown])))


def openset_metrics(known_scores: np.ndarray, known_correct: np.ndarray, unknown_sets: dict[str, np.ndarray], *,
                    threshold: float, keep: float) -> dict[str, Any]:
    """Known images: the share kept and the accuracy of those (against all of them); each unknown set: its size,
    ROC-AUC and the share accepted at ``threshold``; "all": the unknown sets pooled."""
    kept = known_scores <= threshold
    out: dict[str, Any] = {
        "threshold": float(threshold), "keep": float(keep),
        "known": {"n": int(len(known_scores)), "kept": float(kept.mean()) if len(kept) else None,
                  "accuracy_all": float(known_correct.mean()) if len(known_correct) else None,
                  "accuracy_kept": float(known_correct[kept].mean()) if kept.any() else None},
        "unknown": {},
    }
    pooled = [s for s in unknown_sets.values() if len(s)]
    sets = dict(unknown_sets)
    if len(sets) > 1 and pooled:
        sets["all"] = np.concatenate(pooled)
    for name, scores in sets.items():
        out["unknown"][name] = {"n": int(len(scores)),
                                "auroc": auroc(known_scores, scores) if len(scores) and len(known_scores) else None,
                                "accepted": float((scores <= threshold).mean()) if len(scores) else None}
    return out
