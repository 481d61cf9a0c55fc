"""Bias/variance diagnosis against human-level error, as in the course notes ("Understanding Avoidable Bias").

avoidable bias = training error - human error   (how far the model is from what is achievable on train)
variance       = validation error - training error (how much worse it does on images it has not seen)

Whichever is larger names the next step. Training error is measured on the training images without
augmentation, with the final weights (the running accuracy during an epoch mixes augmented images and
changing weights, and would overstate the bias).
"""

from __future__ import annotations

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


def diagnose(train_error: float, val_error: float, human_error: float | None = None) -> dict[str, Any]:
    """The course's diagnosis: avoidable bias vs variance, and what to do next."""
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
        "verdict": verdict, "why": why, "next_steps": NEXT_STEPS[verdict],
    }


def format_diagnosis(d: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    h = f"{d['human_error']:.1%}" + ("" if d["human_error_given"] else " (assumed; set --human-error)")
    lines = [f"diagnosis: {d['verdict'].upper()}  train error {d['train_error']:.1%}  val error {d['val_error']:.1%}  "
             f"human error {h}  avoidable bias {d['avoidable_bias']:.1%}  variance {d['variance']:.1%}",
             f"  {d['why']}"]
    lines += [f"  next: {s}" for s in d["next_steps"]]
    return "\n".join(lines)
