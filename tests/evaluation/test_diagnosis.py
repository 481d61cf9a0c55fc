"""The bias/variance diagnosis's next steps name the knobs the model has: a network's (size, epochs, dropout,
augmentation) or a classical model's (C, k, the features), never the other's."""

from __future__ import annotations

from typing import Any

import pytest

from fovea.evaluation import diagnose
from fovea.models._classical import CLASSIFIERS, DEFAULT_SIZE, FEATURES

# Knobs of the training loop and of a network, which a classical model (fitted in one pass) does not have.
NETWORK_ONLY = ("--dropout", "--epochs", "--augment", "--patience", "--weight-decay", "--l1", "--optimizer",
                "bigger model", "batch norm")
BIAS, VARIANCE = (0.30, 0.32), (0.02, 0.30)  # (training error, validation error) giving each verdict


def fitted(feature: str, classifier: str) -> dict[str, Any]:
    """``transfer["classical"]`` as training/_classical.py writes it for one fit."""
    chosen = {"svm": {"c": 1e-4}, "logreg": {"c": 1e-4}, "nb": {"var_smoothing": 1e-2}, "knn": {"k": 15}}[classifier]
    return {"feature": feature, "classifier": classifier, **chosen, "cv_accuracy": 0.7,
            "features_per_image": FEATURES[feature].dim(DEFAULT_SIZE)}


@pytest.mark.parametrize("classifier", sorted(CLASSIFIERS))
@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize(("errors", "verdict"), [(BIAS, "bias"), (VARIANCE, "variance")])
def test_a_classical_model_gets_none_of_a_networks_knobs(feature: str, classifier: str,
                                                          errors: tuple[float, float], verdict: str) -> None:
    d = diagnose(*errors, classical=fitted(feature, classifier))
    assert d["verdict"] == verdict
    text = "\n".join(d["next_steps"])
    assert d["next_steps"] and not [k for k in NETWORK_ONLY if k in text], text
    if classifier in ("svm", "logreg"):
        assert "--arch c=" in text
    if classifier == "knn":
        assert "--arch k=" in text
    if verdict == "variance":
        assert "more training data" in text


def test_the_classical_steps_move_the_fitted_value_the_right_way() -> None:
    # C is the inverse regularisation strength: bias wants less regularisation (a larger C), variance more.
    assert any("--arch c=0.001" in s for s in diagnose(*BIAS, classical=fitted("hog", "svm"))["next_steps"])
    assert any("--arch c=1e-05" in s for s in diagnose(*VARIANCE, classical=fitted("hog", "logreg"))["next_steps"])
    # k-NN: fewer neighbours follow the training images more closely, more average them out.
    assert any("--arch k=5" in s for s in diagnose(*BIAS, classical=fitted("lbp", "knn"))["next_steps"])
    assert any("--arch k=45" in s for s in diagnose(*VARIANCE, classical=fitted("lbp", "knn"))["next_steps"])
    # Features: bias asks for more kinds (combo) or a network's; variance for fewer values per image.
    bias = "\n".join(diagnose(*BIAS, classical=fitted("colorhist", "nb"))["next_steps"])
    assert "--model combo-nb" in bias and "--model colorhist-logreg" in bias and "--model cnn" in bias
    variance = "\n".join(diagnose(*VARIANCE, classical=fitted("combo", "svm"))["next_steps"])
    assert "--model hog-svm" in variance and f"({FEATURES['combo'].dim(DEFAULT_SIZE)} now)" in variance


def test_a_network_keeps_the_network_advice() -> None:
    assert any("--dropout" in s for s in diagnose(*BIAS)["next_steps"])
    assert any("--dropout" in s for s in diagnose(*VARIANCE)["next_steps"])
    assert any("--epochs" in s for s in diagnose(*BIAS)["next_steps"])
    # "fit" says the same for both kinds: there is nothing to turn.
    assert diagnose(0.05, 0.06, 0.04)["next_steps"] == diagnose(0.05, 0.06, 0.04,
                                                                classical=fitted("hog", "svm"))["next_steps"]
