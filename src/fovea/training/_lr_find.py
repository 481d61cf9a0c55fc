"""``fovea lr-find``: the learning-rate range test (Smith 2015, "Cyclical Learning Rates"; fastai's lr_find).

Train a fresh copy of the model ``fovea train`` would build - same data, augmentation, optimizer, weight
decay, label smoothing, autocast - for ~100 mini-batches while the learning rate grows exponentially from
1e-7 to 10, and watch the smoothed loss: flat while the steps are too small to matter, falling once they
are large enough, exploding once they are too large. The model is thrown away; only the curve and a
suggested peak ``--lr`` for ``fovea train`` come out.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import shlex
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fovea._system import cpu_has_bf16
from fovea.data import choose_store, discover, load_images
from fovea.errors import FoveaError
from fovea.models import default_config, source_of
from fovea.models.backbone import load_weights, read_weights
from fovea.runtime import autocast, pick_device
from fovea.training._config import TrainConfig, preprocess_steps, resolve
from fovea.training._loop import _follow_weights_run, build_model, logit_norm, make_optimizer
from fovea.training._modes import finetune_param_groups

log = logging.getLogger("fovea.training")

RULE = "steepest descent of the smoothed loss, per decade of LR, within 2 decades below its minimum"
FALLBACK_RULE = "minimum of the smoothed loss / 10 (too few points before the minimum for a slope)"


@dataclass
class LRFind:
    """The range test's curve and what it suggests.

    Attributes:
        lrs, losses, smoothed: one entry per mini-batch (losses: the raw batch loss).
        suggestion: the suggested peak learning rate for ``fovea train --lr``.
        rule: how ``suggestion`` was chosen.
        min_loss_lr: where the smoothed loss was lowest.
        steepest_lr: where the smoothed loss fell fastest (per decade of LR), before its minimum.
        diverged_lr: where the test stopped because the loss blew up (None: it ran all its steps).
        default_lr: the peak LR ``fovea train`` would pick on its own for this setup.
        train_args: the ``fovea train`` options that reproduce this setup (besides DATA and --lr).
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    rule: str
    min_loss_lr: float
    steepest_lr: float
    diverged_lr: float | None
    default_lr: float
    config: TrainConfig
    out: Path
    seconds: float = 0.0
    train_args: list[str] = field(default_factory=list)

    def command(self) -> str:
        """The ``fovea train`` command that uses the suggestion."""
        return shlex.join(["fovea", "train", self.config.data, *self.train_args, "--lr", f"{self.suggestion:.3g}"])


# ------------------------------------------------------------------------------------ the numbers (pure)


def exp_lrs(start: float, end: float, steps: int) -> np.ndarray:
    """``steps`` learning rates growing geometrically from ``start`` to ``end`` (both included)."""
    if not 0 < start < end or steps < 2:
        raise ValueError(f"need 0 < start < end and steps >= 2, got {start}, {end}, {steps}")
    return start * (end / start) ** (np.arange(steps) / (steps - 1))


def smooth(losses: Iterable[float], beta: float = 0.98) -> np.ndarray:
    """Exponential moving average with bias correction (Adam's): an unbiased mean from the first step on."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return np.array(out, dtype=float)


def suggest(lrs: np.ndarray, smoothed: np.ndarray, skip_start: int = 10) -> tuple[float, str, float, float]:
    """(suggestion, rule, min_loss_lr, steepest_lr) from a range-test curve; non-finite points are ignored.

    The suggestion is the point of steepest descent of the smoothed loss (Smith 2015: where the loss
    falls fastest; fastai's ``lr_steep``), made robust in two ways, both measured:

    - the slope is taken across one decade of LR, not point to point: point to point it landed at
      1e-7, in the noise of the plateau, on all 3 seeds on pets (cnn, SGD, 64 px, batch 128);
    - only the two decades before the minimum are searched: the descent that matters ends there.
      Searching the whole plateau too, the EMA's warm-up wobble won on tiny_pets (batch 16): 5e-7.

    Why not a tenth of the minimum (fastai's ``lr_min``)? Because ``fovea train`` runs one-cycle, whose
    peak is held only briefly. On pets, 10 one-cycle epochs at peak LR 0.008 / 0.025 / 0.08 / 0.25 reached
    68.6 / 75.8 / 77.0 / 75.8 % val accuracy (train loss 0.609 / 0.535 / 0.512 / 0.557); min/10 was
    0.0066-0.024 over 3 seeds (under-training), steepest 0.021-0.079 (the best region). The steepest
    decade ends at or before the minimum, so the suggestion is at least sqrt(10) ~ 3x below it, and
    the minimum comes before the blow-up. With fewer than a decade of points before the minimum the
    suggestion falls back to the minimum / 10.

    The first ``skip_start`` points are left out (as fastai's plot does): there the moving average has
    seen fewer than 10 batches, and one lucky first batch made the minimum of a fine-tuning curve.
    """
    ok = np.isfinite(smoothed)
    lrs, smoothed = np.asarray(lrs, dtype=float)[ok], np.asarray(smoothed, dtype=float)[ok]
    if len(lrs) < 3:
        raise FoveaError("the learning-rate range test diverged at once; lower the start LR (--start-lr)")
    skip = min(skip_start, len(lrs) - 3)
    lrs, smoothed = lrs[skip:], smoothed[skip:]
    i_min = int(np.argmin(smoothed))
    min_lr = float(lrs[i_min])
    per_decade = (len(lrs) - 1) / max(float(np.log10(lrs[-1] / lrs[0])), 1e-12)
    k = max(1, round(per_decade))  # points in one decade of LR
    if i_min < k:
        return min_lr / 10, FALLBACK_RULE, min_lr, min_lr
    lo = max(0, i_min - 2 * k)
    # (smoothed[j + k] - smoothed[j]) per decade, for every decade [j, j + k] inside [lo, i_min].
    a, b = np.arange(lo, i_min - k + 1), np.arange(lo + k, i_min + 1)
    slope = (smoothed[b] - smoothed[a]) / np.log10(lrs[b] / lrs[a])
    j = int(np.argmin(slope))
    steepest = float(np.sqrt(lrs[a[j]] * lrs[b[j]]))  # the geometric middle of the steepest decade
    return steepest, RULE, min_lr, steepest


# --------------------------------------------------------------------------------------------- the run


def _cycle(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches forever: a fresh shuffle and augmentation each pass, as epochs would have."""
    while True:
        yield from batches


def range_test(step: Callable[[torch.Tensor, torch.Tensor, float], float],
               batches: Iterable[tuple[torch.Tensor, torch.Tensor]], lrs: np.ndarray, *, beta: float = 0.98,
               diverge: float = 4.0, on_step: Callable[[int, float, float], None] | None = None,
               ) -> tuple[list[float], list[float], list[float], float | None]:
    """Run ``step(x, y, lr) -> loss`` once per LR; stop when the smoothed loss exceeds ``diverge`` x its
    minimum or is not finite. Returns (lrs, losses, smoothed, diverged_lr or None)."""
    out_lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg, best = 0.0, math.inf
    for i, (lr, (x, y)) in enumerate(zip(lrs, _cycle(batches))):
        loss = step(x, y, float(lr))
        avg = beta * avg + (1 - beta) * loss
        s = avg / (1 - beta ** (i + 1))
        out_lrs.append(float(lr))
        losses.append(loss)
        smoothed.append(s)
        if on_step is not None:
            on_step(i, float(lr), s)
        if not math.isfinite(s) or s > diverge * best:
            return out_lrs, losses, smoothed, float(lr)
        best = min(best, s)
    return out_lrs, losses, smoothed, None


# Options a user may set that change what a learning rate means, with TrainConfig's defaults.
_PASSED_ON = {"weight_decay": ("--weight-decay", None), "label_smoothing": ("--label-smoothing", 0.1),
              "logit_norm": ("--logit-norm", 0.0),
              "augment": ("--augment", None), "dropout": ("--dropout", None), "device": ("--device", "auto"),
              "preprocess": ("--preprocess", ())}


def _train_args(given: TrainConfig, cfg: TrainConfig, transfer: bool, from_run: bool) -> list[str]:
    """The ``fovea train`` options that rebuild the setup tested (besides DATA and --lr).

    Optimizer, batch size and image size are always spelled out: the best LR depends on all three, and
    `fovea train` on another device would otherwise pick other defaults (a GPU takes bigger batches).
    """
    args: list[str] = []
    if cfg.weights:
        args += ["--weights", str(cfg.weights)]
    if not from_run:  # a run folder brings its architecture along
        args += ["--model", str(cfg.model)]
    if given.pretrained is False:
        args.append("--no-pretrained")
    if transfer:
        args += ["--mode", "finetune"]
    args += ["--optimizer", str(cfg.optimizer), "--batch-size", str(cfg.batch_size), "--image-size", str(cfg.image_size)]
    for name, (flag, default) in _PASSED_ON.items():
        value = getattr(given, name)
        if value != default:
            args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return args


def lr_find(data: str | Path, *, out: str | Path | None = None, start_lr: float = 1e-7, end_lr: float = 10.0,
            steps: int = 100, beta: float = 0.98, diverge: float = 4.0, **kwargs: Any) -> LRFind:
    """The learning-rate range test on ``data``; writes ``lr_find.csv`` and ``lr_find.png`` into ``out``.

    Args:
        data: what ``fovea train`` takes: a folder or a CSV.
        out: folder for the curve (default ``runs/lr-find-DATA-TIME``).
        start_lr, end_lr, steps: the exponential sweep, one mini-batch per LR (the data is cycled).
        beta: smoothing of the loss (fastai's 0.98).
        diverge: stop once the smoothed loss exceeds this multiple of its minimum (Smith's and fastai's 4).
        kwargs: TrainConfig fields (model, weights, pretrained, optimizer, batch_size, image_size, device, ...),
            defaulted exactly as ``fovea train`` defaults them.
    """
    t0 = time.perf_counter()
    if not 0 < start_lr < end_lr or steps < 2:
        raise FoveaError(f"need 0 < --start-lr < --end-lr and --steps >= 2, got {start_lr}, {end_lr}, {steps}")
    cfg = TrainConfig(data=str(data), **kwargs)
    cfg.validate()
    given = dataclasses.replace(cfg)  # what the user chose, before defaults fill it
    weights_state, weights_meta = (None, None)
    if cfg.weights:
        weights_state, weights_meta = read_weights(cfg.weights)
        cfg = _follow_weights_run(cfg, weights_meta)
    cfg.model = cfg.model or "cnn"
    source = source_of(cfg.model)  # a misspelt --model fails here, before any image is decoded
    native = default_config(cfg.model)
    if native.get("kind") == "classical":
        raise FoveaError(f"{cfg.model} has no learning rate: a classical model is fitted in one pass by scikit-learn "
                         "(its C or k chosen by cross-validation); train it with fovea train")
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    ds = discover(cfg.data, cfg.val_fraction, cfg.seed)
    cfg, why = resolve(cfg, device_type=device.type, n_train=len(ds.splits["train"]), source=source,
                       native_size=int(native["input_size"]), cpu_bf16=cpu_has_bf16())
    for k in ("image_size", "batch_size", "optimizer", "amp"):
        if k in why:
            log.info("%s: %s", k, why[k])
    assert cfg.lr is not None and cfg.optimizer is not None, "resolve() sets lr and optimizer"
    # Loss terms train may add on top of cross-entropy are not part of this test's step (getattr: they are
    # newer than this module); the curve then describes plain (label-smoothed) cross-entropy.
    extras = [f"--{n}" for n in ("mixup", "cutmix", "l1") if getattr(cfg, n, None)]
    extras += [f"--{n.replace('_', '-')} {getattr(cfg, n)}" for n, off in (("class_weights", "none"), ("sampler", "shuffle"))
               if getattr(cfg, n, off) != off]
    if extras:
        log.warning("lr-find does not apply %s: the curve is for plain cross-entropy", ", ".join(extras))
    transfer = bool(cfg.weights or cfg.pretrained)
    size = int(cfg.image_size or 64)
    store, store_why = choose_store(cfg.cache, len(ds.splits["train"]), size, device)  # as fovea train chooses
    log.info("images: %s", store_why)
    train_set = load_images(ds.splits["train"], size, cache=cfg.keeps_cache, progress=cfg.progress,
                            description="decoding train", preprocess=preprocess_steps(cfg), store=store)
    for p, r in train_set.quarantined:
        log.warning("quarantined %s: %s", p, r)
    if len(train_set) == 0:
        raise FoveaError("no usable training images (all quarantined); run `fovea check` on the data")
    lost = [c for i, c in enumerate(ds.classes) if i not in set(train_set.labels.tolist())]
    if lost:  # as fovea train would refuse: a curve for a setup that cannot train is no help
        raise FoveaError(f"class(es) with no usable training image after quarantine: {', '.join(lost)}")

    model, _ = build_model(cfg, len(ds.classes), size)
    mean, std = tuple(native["mean"]), tuple(native["std"])
    if weights_meta is not None:
        mean, std = tuple(weights_meta["preprocessing"]["mean"]), tuple(weights_meta["preprocessing"]["std"])
    if cfg.weights:
        log.info("weights: %s", load_weights(model, cfg.weights, weights_state).summary())
    model.to(device).train()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    wd = float(cfg.weight_decay or 0.0)
    if transfer:
        # Trained weights: the LR that matters is the peak of `fovea train --mode finetune`, which scales
        # the backbone's groups below the head's (discriminative LRs); the test sweeps that same peak.
        groups, _, _ = finetune_param_groups(model, float(cfg.freeze or 0.0), wd)
        opt = make_optimizer(cfg.optimizer, model, start_lr, wd, groups=groups)
    else:
        opt = make_optimizer(cfg.optimizer, model, start_lr, wd)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    bkw: dict[str, Any] = {"device": device, "mean": mean, "std": std, "augment": str(cfg.augment), "shuffle": True,
                           "drop_last": True, "generator": generator, "channels_last": bool(cfg.channels_last)}
    batches = train_set.batches(int(cfg.batch_size or 128), **bkw)  # read from its file when on disk, as in training
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def step(x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        with autocast(device, bool(cfg.amp)):
            loss = loss_fn(logit_norm(model(x).float(), cfg.logit_norm), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())  # syncs the GPU every step: ~100 steps, and the stopping rule needs the value

    lrs = exp_lrs(start_lr, end_lr, steps)
    log.info("range test: %d mini-batches of %d, LR %g -> %g (%s, %s)", steps, batches.batch_size, start_lr, end_lr,
             cfg.optimizer, cfg.model)
    with _Progress(cfg.progress, steps) as bar:
        got_lrs, losses, smoothed, diverged = range_test(step, batches, lrs, beta=beta, diverge=diverge,
                                                         on_step=bar.update)
    suggestion, rule, min_lr, steepest = suggest(np.array(got_lrs), np.array(smoothed))
    run = Path(out) if out else Path("runs") / f"lr-find-{Path(cfg.data).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    result = LRFind(got_lrs, losses, smoothed, suggestion, rule, min_lr, steepest, diverged, float(cfg.lr), cfg, run,
                    train_args=_train_args(given, cfg, transfer, from_run=weights_meta is not None))
    write_curve(result)
    result.seconds = time.perf_counter() - t0
    log.info("lr-find: %d steps in %.1f s; suggestion %.3g (%s)", len(got_lrs), result.seconds, suggestion, rule)
    return result


class _Progress:
    """A rich progress bar on a terminal (LR and smoothed loss), nothing in logs and pipes."""

    def __init__(self, enabled: bool, total: int) -> None:
        from rich.console import Console

        self.bar: Any = None
        if enabled and Console(stderr=True).is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("lr-find"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("lr {task.fields[lr]:.2e} loss {task.fields[loss]:.4f}"),
                                TimeElapsedColumn(), transient=True)
            self.task = self.bar.add_task("lr-find", total=total, lr=0.0, loss=math.nan)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, i: int, lr: float, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=i + 1, lr=lr, loss=loss)


# ------------------------------------------------------------------------------------------- the output


def write_curve(r: LRFind) -> None:
    """``lr_find.csv`` (lr, loss, smoothed: one row per mini-batch) and ``lr_find.png`` (log LR axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r.out.mkdir(parents=True, exist_ok=True)
    with (r.out / "lr_find.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lr", "loss", "smoothed"])
        w.writerows((f"{lr:.6g}", f"{loss:.6g}", f"{s:.6g}") for lr, loss, s in zip(r.lrs, r.losses, r.smoothed))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lrs, losses, smoothed = np.array(r.lrs), np.array(r.losses), np.array(r.smoothed)
    ax.plot(lrs, losses, color="0.75", lw=1, label="batch loss")
    ax.plot(lrs, smoothed, color="C0", lw=2, label="smoothed")
    finite = smoothed[np.isfinite(smoothed)]
    lo, hi = float(finite.min()), float(finite.max())
    ax.set_ylim(lo - 0.05 * (hi - lo), min(hi, 4 * lo) + 0.05 * (hi - lo))  # the blow-up would flatten the rest
    ax.axvline(r.suggestion, color="C3", ls="--", label=f"suggested --lr {r.suggestion:.3g} ({r.rule.split(',')[0]})")
    ax.plot([r.min_loss_lr], [np.interp(np.log(r.min_loss_lr), np.log(lrs), smoothed)], "o", color="C2",
            label=f"minimum at {r.min_loss_lr:.3g}")
    ax.axvline(r.min_loss_lr / 10, color="C2", ls=":", label=f"minimum / 10 (more cautious) {r.min_loss_lr / 10:.3g}")
    ax.axvline(r.default_lr, color="0.4", ls=":", label=f"fovea train's default {r.default_lr:.3g}")
    ax.set(xscale="log", xlabel="learning rate (log scale)", ylabel="training loss",
           title=f"LR range test: {r.config.model} on {Path(r.config.data).name}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    fig.savefig(r.out / "lr_find.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
