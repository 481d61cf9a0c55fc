"""classification_metrics and accuracy_interval against cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from fovea.evaluation import accuracy_interval, classification_metrics


def binary_probs(p1: list[float]) -> np.ndarray:
    p = np.asarray(p1)
    return np.stack([1 - p, p], axis=1)


# y_true: 6 cats, 2 dogs. Predicted (p_dog > 0.5): cats 0 0 0 0 1 1, dogs 1 0.
Y = np.array([0, 0, 0, 0, 0, 0, 1, 1])
P_DOG = [0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.45]


def test_binary_counts_and_rates() -> None:
    m = classification_metrics(Y, binary_probs(P_DOG), ["cat", "dog"])
    assert m["confusion_matrix"] == [[4, 2], [1, 1]]
    assert m["accuracy"] == pytest.approx(5 / 8)
    lo, hi = m["accuracy_95ci"]  # Wilson interval of 5/8: wide, as 8 images deserve
    assert lo == pytest.approx(0.3057, abs=1e-3) and hi == pytest.approx(0.8632, abs=1e-3)
    # recall cat 4/6, recall dog 1/2
    assert m["balanced_accuracy"] == pytest.approx((4 / 6 + 1 / 2) / 2)
    cat, dog = m["per_class"]["cat"], m["per_class"]["dog"]
    assert cat["precision"] == pytest.approx(4 / 5) and dog["precision"] == pytest.approx(1 / 3)
    assert cat["recall"] == pytest.approx(2 / 3) and dog["recall"] == pytest.approx(1 / 2)
    assert cat["f1"] == pytest.approx(8 / 11) and dog["f1"] == pytest.approx(0.4)
    assert (cat["support"], dog["support"]) == (6, 2)
    assert m["f1_macro"] == pytest.approx((8 / 11 + 0.4) / 2)
    assert m["n_images"] == 8
    assert m["classes"] == ["cat", "dog"]


def test_binary_auc_counts_ranked_pairs() -> None:
    # Positive 0.8 outranks all 6 negatives, positive 0.45 outranks 4 of them: 10 of 12 pairs.
    m = classification_metrics(Y, binary_probs(P_DOG), ["cat", "dog"])
    assert m["roc_auc"] == pytest.approx(10 / 12)
    assert set(m["roc_curves"]) == {"cat", "dog"}
    dog = m["roc_curves"]["dog"]
    assert dog["fpr"][0] == 0.0 and dog["fpr"][-1] == 1.0 and dog["tpr"][-1] == 1.0


def test_balanced_accuracy_exposes_a_majority_guesser() -> None:
    y = np.array([0] * 9 + [1])
    m = classification_metrics(y, binary_probs([0.1] * 10), ["common", "rare"])
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["per_class"]["rare"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["confusion_matrix"] == [[9, 0], [1, 0]]


def test_auc_perfect_and_inverted_ranking() -> None:
    y = np.array([0, 0, 0, 1, 1])
    perfect = classification_metrics(y, binary_probs([0.1, 0.2, 0.3, 0.55, 0.9]), ["a", "b"])
    inverted = classification_metrics(y, binary_probs([0.9, 0.8, 0.7, 0.3, 0.1]), ["a", "b"])
    assert perfect["roc_auc"] == pytest.approx(1.0)
    assert perfect["accuracy"] == pytest.approx(1.0)
    assert inverted["roc_auc"] == pytest.approx(0.0)
    assert inverted["accuracy"] == pytest.approx(0.0)


def test_three_class_one_vs_rest_auc() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([
        [0.60, 0.30, 0.10],
        [0.45, 0.35, 0.20],
        [0.30, 0.50, 0.20],
        [0.50, 0.20, 0.30],
        [0.20, 0.20, 0.60],
        [0.10, 0.30, 0.60],
    ])
    m = classification_metrics(y, probs, ["a", "b", "c"])
    # One vs rest: a 7/8 pairs, b 4.5/8 (one tie counts half), c 8/8; macro mean.
    assert m["roc_auc"] == pytest.approx((7 / 8 + 4.5 / 8 + 1.0) / 3)
    assert m["confusion_matrix"] == [[2, 0, 0], [1, 1, 0], [0, 0, 2]]
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["per_class"]["a"]["precision"] == pytest.approx(2 / 3)


def test_auc_is_none_when_a_class_is_absent() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["roc_auc"] is None
    assert m["roc_curves"] == {}
    # Balanced accuracy averages recall over the classes that occur: (1/2 + 1/2) / 2.
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["per_class"]["c"]["support"] == 0
    assert m["confusion_matrix"][2] == [0, 0, 0]


def test_wilson_interval_known_value() -> None:
    # 8 of 10 at 95 %: the textbook Wilson interval is (0.4902, 0.9433).
    lo, hi = accuracy_interval(8, 10)
    assert lo == pytest.approx(0.490157, abs=1e-5)
    assert hi == pytest.approx(0.943318, abs=1e-5)


def test_wilson_interval_shape() -> None:
    lo, hi = accuracy_interval(10, 10)
    assert hi == pytest.approx(1.0) and 0.65 < lo < 0.75  # never a zero-width interval at 100 %
    small = accuracy_interval(80, 100)
    large = accuracy_interval(800, 1000)
    assert small[0] < large[0] < 0.8 < large[1] < small[1]
    assert accuracy_interval(0, 0) == (0.0, 0.0)
