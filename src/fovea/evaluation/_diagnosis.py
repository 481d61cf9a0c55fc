"""Bias/variance diagnosis against human-level error, as in the course notes ("Understanding Avoidable Bias").

avoidable bias = training error - human error   (how far the model is from what is achievable on train)
variance       = validation error - training error (how much worse it does on images it has not seen)

Whichever is larger names the next step, in the knobs the model has: a network's (size, epochs, dropout,
augmentation) or a classical model's (C, k, the features; ``classical_steps``), told apart by the
artifact's ``transfer["classical"]`` entry, which only a classical model's fit writes. Training error is
measured on the training images without augmentation, with the final weights (the running accuracy during an
epoch mixes augmented images and changing weights, and would overstate the bias).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Below this both gaps count as closed: within the sampling noise of a few hundred validation images.
CLOSE = 0.02

NEXT_STEPS = {
    "bias": ["train a bigger model (wider or deeper, or a pretrained backbone with --weights / --pretrained)",
             "train longer (--epochs) or with a better optimizer (--optimizer adamw; `fovea lr-find` for a better --lr)",
             "regularize less (lower --dropout, --weight-decay, --l1; lighter --augment)"],
    "variance": ["get more training data (or transfer from a related data set: --weights RUN --mode auto)",
                 "regularize: --dropout, --weight-decay, --l1, batch norm",
                 "augment more: --augment standard or strong (mixup/cutmix)",
                 "stop early (--patience) or use a smaller model"],
    "fit": ["both gaps are within 2 points: the model is as good as this data and human error allow; "
            "check the errors themselves (report, confusion matrix) or collect harder examples"],
}


def classical_steps(verdict: str, classical: Mapping[str, Any]) -> list[str]:
    """The next steps for a classical model (``transfer["classical"]``: feature, classifier, the C or k used,
    features per image): its knobs instead of a network's, which it does not have (no epochs, dropout or
    augmentation: it is fitted in one pass on the images as they are)."""
    if verdict == "fit":
        return NEXT_STEPS["fit"]
    feature, classifier = str(classical.get("feature")), str(classical.get("classifier"))
    c, k, n = classical.get("c"), classical.get("k"), classical.get("features_per_image")
    cnn = "let a network learn its features: --model cnn, or a pretrained backbone (--model resnet18)"
    steps: list[str] = []
    if verdict == "bias":
        if c is not None:
            steps.append(f"regularise less: a larger C than {c:g} (C is the inverse regularisation strength): "
                         f"--arch c={10 * c:g}")
        if k is not None and k > 1:
            steps.append(f"follow fewer, closer neighbours: a smaller k than {k} (--arch k={max(1, k // 3)})")
        if classifier == "nb":
            steps.append(f"naive Bayes takes every feature as independent of the others, which {feature}'s are not: "
                         f"a linear model (--model {feature}-logreg or {feature}-svm)")
        if feature != "combo":
            steps.append(f"more kinds of features: --model combo-{classifier} (shape, colour and texture together)")
        return [*steps, cnn]
    steps.append("get more training data")
    if c is not None:
        steps.append(f"regularise more: a smaller C than {c:g} (--arch c={c / 10:g})")
    if k is not None:
        steps.append(f"average more neighbours: a larger k than {k} (--arch k={3 * k}); the training error counts "
                     "each training image among its own neighbours, so a small k always looks like variance")
    if feature == "combo":
        steps.append(f"fewer features per image ({n} now): one kind alone, e.g. --model hog-{classifier}")
    elif feature == "hog":
        steps.append(f"fewer features per image ({n} now): HOG's length grows with the image's area, so a smaller "
                     "--image-size")
    return [*steps, "transfer what a network learnt on other images: --model resnet18 --mode features (a linear head "
                    "on its pretrained features)"]


def diagnose(train_error: float, val_error: float, human_error: float | None = None, *,
             classical: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The course's diagnosis: avoidable bias vs variance, and what to do next (for a classical model, what its
    fit recorded in ``transfer["classical"]``, in its own knobs)."""
    h = 0.0 if human_error is None else float(human_error)
    bias = train_error - h
    variance = val_error - train_error
    if max(bias, variance) < CLOSE:
        verdict = "fit"
        why = f"avoidable bias {bias:.1%} and variance {variance:.1%} are both under {CLOSE:.0%}"
    elif bias >= variance:
        verdict = "bias"
        why = (f"avoidable bias {bias:.1%} (training error {train_error:.1%} - human error {h:.1%}) is larger than "
               f"variance {variance:.1%}: the model does not fit even the images it trains on")
    else:
        verdict = "variance"
        why = (f"variance {variance:.1%} (validation error {val_error:.1%} - training error {train_error:.1%}) is "
               f"larger than avoidable bias {bias:.1%}: the model fits its training images but does not generalise")
    return {
        "human_error": h, "human_error_given": human_error is not None,
        "train_error": train_error, "val_error": val_error,
        "avoidable_bias": bias, "variance": variance,
        "verdict": verdict, "why": why,
        "next_steps": NEXT_STEPS[verdict] if classical is None else classical_steps(verdict, classical),
    }


def format_diagnosis(d: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    h = f"{d['human_error']:.1%}" + ("" if d["human_error_given"] else " (assumed; set --human-error)")
    lines = [f"diagnosis: {d['verdict'].upper()}  train error {d['train_error']:.1%}  val error {d['val_error']:.1%}  "
             f"human error {h}  avoidable bias {d['avoidable_bias']:.1%}  variance {d['variance']:.1%}",
             f"  {d['why']}"]
    lines += [f"  next: {s}" for s in d["next_steps"]]
    return "\n".join(lines)
