"""``fovea train``: data -> cached uint8 tensors on the device -> one short loop -> a run folder."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from fovea.artifact import autocast, infer, pick_device, save_artifact
from fovea.data import Batches, Dataset, ImageSet, discover, kfold, load_images
from fovea.errors import FoveaError
from fovea.models import check_input_size, create_model, default_config, source_of
from fovea.models._transfer import fold_probe, load_weights, read_weights
from fovea.training._callbacks import BestTracker, Callback, Checkpointer, CSVLogger, ProgressBar
from fovea.training._checkpoint import has_checkpoint, load_checkpoint
from fovea.training._config import TrainConfig, resolve
from fovea.training._schedule import lr_at
from fovea.training._transfer import (
    FeatureBatches,
    Freezer,
    choose_mode,
    features,
    finetune_param_groups,
    measure_shift,
    two_phase_lr,
)

log = logging.getLogger("fovea.training")


@dataclass
class Fit:
    """Everything the loop and its callbacks share."""

    cfg: TrainConfig
    run: Path
    model: nn.Module
    opt: torch.optim.Optimizer
    batches: Batches
    val: ImageSet
    device: torch.device
    generator: torch.Generator
    callbacks: list[Callback]
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    running: dict[str, float] = field(default_factory=dict)
    epoch_start: float = 0.0
    best_score: float | None = None
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    stop: bool = False
    val_images: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # val set, kept on the device
    val_features: torch.Tensor | None = None  # features mode: the val set's embeddings
    lr_fn: Any = None  # step -> learning rate; None: the configured schedule over the whole run

    def fire(self, event: str) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self)


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: where oneDNN runs bf16 convolutions natively (2x fp32, measured on Zen 4)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float,
                   groups: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
    if groups is None:
        # No weight decay on biases and norm parameters (1-D tensors): decaying them only hurts.
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=0.9)
    raise FoveaError(f"unknown optimizer {name!r}")


def evaluate_logits(fit: Fit, tta: bool = False) -> torch.Tensor:
    """Validation logits. Per-epoch checks skip test-time augmentation (half the cost); the final one uses it."""
    if fit.val_features is not None:
        fit.model.eval()
        with torch.no_grad():
            out = fit.model(fit.val_features).float().cpu()
        fit.model.train()
        return out
    return infer(fit.model, fit.val_images, mean=fit.batches.mean, std=fit.batches.std, device=fit.device,
                 amp=bool(fit.cfg.amp), tta=tta, channels_last=bool(fit.cfg.channels_last))


def run_epoch(fit: Fit, step_fn: Any) -> None:
    """One pass over the training data, then validation; appends a history row."""
    cfg = fit.cfg
    fit.model.train()
    fit.epoch_start = time.perf_counter()
    total_steps = fit.steps_per_epoch * int(cfg.epochs or 1)
    peak = cfg.lr
    assert peak is not None, "resolve() sets the learning rate"
    loss_sum = torch.zeros((), device=fit.device)
    correct = torch.zeros((), device=fit.device)
    seen = 0
    fit.running = {}
    fit.fire("before_epoch")
    lr_of = fit.lr_fn or (lambda step: lr_at(step, total_steps, peak, cfg.schedule))
    for x, y in fit.batches:
        lr = lr_of(fit.step)
        for g in fit.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # discriminative learning rates when fine-tuning
        loss, logits = step_fn(x, y)
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        fit.step += 1
        # Reading the running loss syncs the GPU and stops the CPU queueing work ahead: every 10th step at most.
        if fit.step % max(10, fit.steps_per_epoch // 10) == 0:
            fit.running = {"loss": float(loss_sum) / seen, "acc": float(correct) / seen, "seen": seen}
        fit.fire("after_batch")
    if fit.device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - fit.epoch_start
    logits = evaluate_logits(fit)
    val_loss = F.cross_entropy(logits, fit.val.labels).item() if len(fit.val) else float("nan")
    val_acc = (logits.argmax(1) == fit.val.labels).float().mean().item() if len(fit.val) else float("nan")
    fit.history.append({
        "epoch": fit.epoch + 1, "lr": lr_of(fit.step - 1),
        "train_loss": float(loss_sum) / max(seen, 1), "train_acc": float(correct) / max(seen, 1),
        "val_loss": val_loss, "val_acc": val_acc,
        "images_per_s": seen / max(train_seconds, 1e-9), "seconds": time.perf_counter() - fit.epoch_start,
    })
    fit.fire("after_epoch")


def _follow_weights_run(cfg: TrainConfig, meta: dict[str, Any] | None) -> TrainConfig:
    """Weights from a Fovea run: its architecture (and options) and image size, unless the user chose."""
    if meta is None:
        return cfg
    arch = meta.get("architecture", {})
    if cfg.model and cfg.model != arch.get("name"):
        raise FoveaError(f"--weights {cfg.weights} holds a {arch.get('name')}, not a {cfg.model}; "
                         f"drop --model or use --model {arch.get('name')}")
    kwargs = {k: v for k, v in arch.get("kwargs", {}).items() if k != "drop_rate"}
    preprocess = cfg.preprocess
    recorded = meta.get("preprocessing", {}).get("steps") or []
    if not preprocess and recorded:  # the backbone learnt on preprocessed images: keep feeding it those
        from fovea.ops import parse_steps

        preprocess = ",".join(str(s) for s in parse_steps(recorded))
        log.info("preprocess: %s, as the --weights run was trained (--preprocess none to drop it)", preprocess)
    return dataclasses.replace(cfg, model=arch.get("name"), extra={**kwargs, **cfg.extra}, preprocess=preprocess,
                               image_size=cfg.image_size or int(meta["preprocessing"]["image_size"]))


def build_model(cfg: TrainConfig, num_classes: int, size: int) -> tuple[nn.Module, dict[str, Any]]:
    """The network ``cfg`` describes (its --arch options and --dropout, which model.json records), probed once
    with a blank image so a size too small for it fails here; returns it with those options."""
    arch_kwargs = dict(cfg.extra)
    if cfg.dropout is not None:
        arch_kwargs["drop_rate"] = cfg.dropout
    model = create_model(str(cfg.model), num_classes, image_size=size, pretrained=bool(cfg.pretrained), **arch_kwargs)
    check_input_size(model, size, str(cfg.model))
    return model, arch_kwargs


def _steps(cfg: TrainConfig) -> list[Any]:
    """The --preprocess steps (fovea.ops.Step); OpenCV is imported only when there are some."""
    if not cfg.preprocess or cfg.preprocess == "none":
        return []
    from fovea.ops import parse_steps

    return parse_steps(cfg.preprocess)


def _default_out(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(cfg.data).stem}-{cfg.model or Path(str(cfg.weights)).name}-{stamp}"


def train(data: str | Path, **kwargs: Any) -> Path:
    """Train a model on ``data`` and write a run folder; returns its path. kwargs: TrainConfig fields.

    With ``folds=K`` the folder holds K runs (fold-1 ...) and cv.json; with ``seeds=N`` it holds N runs
    (seed-0 ...) and is itself the ensemble of them (a model artifact averaging their probabilities).
    """
    cfg = TrainConfig(data=str(data), **kwargs)
    cfg.validate()
    if cfg.folds or cfg.seeds > 1:
        out = Path(cfg.out) if cfg.out else _default_out(cfg)
        if out.exists() and any(out.iterdir()):
            raise FoveaError(f"{out} already exists and is not empty; choose another --out")
        ds = discover(cfg.data, cfg.val_fraction, cfg.seed, group_regex=cfg.group_regex)
        return _cross_validate(cfg, ds, out) if cfg.folds else _train_seeds(cfg, ds, out)
    return _train(cfg)


def _summary(values: list[float | None]) -> dict[str, float | None]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


CV_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "f1_macro", "train_accuracy")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _cross_validate(cfg: TrainConfig, ds: Dataset, out: Path) -> Path:
    """K runs, one per fold (train + val pooled, stratified and group-aware); cv.json holds mean +- spread."""
    folds = kfold(ds, int(cfg.folds or 2), cfg.seed)
    rows = []
    for i, fold_ds in enumerate(folds, 1):
        log.info("fold %d of %d: %d train, %d val images", i, len(folds), len(fold_ds.splits["train"]),
                 len(fold_ds.splits["val"]))
        run = _train(dataclasses.replace(cfg, folds=None, out=str(out / f"fold-{i}")), fold_ds)
        m = json.loads((run / "metrics.json").read_text())
        rows.append({"fold": i, "run": str(run), "n_train": m["n_train"], "n_val": m["n_val"],
                     **{k: m.get(k) for k in CV_METRICS}})
    summary = {k: _summary([r[k] for r in rows]) for k in CV_METRICS}
    cv = {"folds": rows, "k": len(folds), "summary": summary, "std": "sample standard deviation over folds (ddof=1)",
          "config": cfg.to_dict()}
    (out / "cv.json").write_text(json.dumps(cv, indent=2))
    lines = ["| fold | train | val | accuracy | balanced accuracy | ROC-AUC |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['fold']} | {r['n_train']} | {r['n_val']} | {_fmt(r['accuracy'])} | {_fmt(r['balanced_accuracy'])} | "
              f"{_fmt(r['roc_auc'])} |" for r in rows]
    pm = {k: f"{_fmt(summary[k]['mean'])} ± {_fmt(summary[k]['std'])}" for k in CV_METRICS}
    lines.append(f"| mean ± std | | | {pm['accuracy']} | {pm['balanced_accuracy']} | {pm['roc_auc']} |")
    (out / "cv.md").write_text("\n".join(lines) + "\n")
    return out


def _train_seeds(cfg: TrainConfig, ds: Dataset, out: Path) -> Path:
    """N runs on one split with seeds seed..seed+N-1, then their ensemble written into ``out``."""
    from fovea.artifact import load
    from fovea.ensemble import make_ensemble
    from fovea.evaluation import classification_metrics

    runs = []
    for i in range(cfg.seeds):
        seed = cfg.seed + i
        log.info("seed %d (%d of %d)", seed, i + 1, cfg.seeds)
        runs.append(_train(dataclasses.replace(cfg, seeds=1, seed=seed, out=str(out / f"seed-{seed}")), ds))
    make_ensemble(runs, out, progress=cfg.progress)
    # The ensemble on the members' own validation split (one split for all: only the seeds differ).
    ens = load(out, cfg.device)
    val = load_images(ds.splits["val"], ens.image_size, cache=cfg.cache, progress=False)
    members = [json.loads((r / "metrics.json").read_text()) for r in runs]
    metrics: dict[str, Any] = {}
    if len(val):
        metrics = classification_metrics(val.labels.numpy(), ens.predict_proba(val.images), ds.classes)
    metrics.pop("roc_curves", None)
    metrics.update({"members": [{"run": str(r), **{k: m.get(k) for k in CV_METRICS}} for r, m in zip(runs, members)],
                    "members_summary": {k: _summary([m.get(k) for m in members]) for k in CV_METRICS},
                    "n_val": len(val), "n_train": members[0]["n_train"], "skipped": members[0]["skipped"]})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return out


def _train(cfg: TrainConfig, dataset: Dataset | None = None) -> Path:
    """One run. ``dataset``: an already split data set (a fold, or the split shared by --seeds runs)."""
    run = Path(cfg.out) if cfg.out else _default_out(cfg)
    if cfg.resume:
        if not has_checkpoint(run):
            raise FoveaError(f"--resume: no checkpoint in {run}; give the run folder with --out")
        try:
            saved = json.loads((run / "train_config.json").read_text())
            resumed = TrainConfig(**{**saved, "resume": True, "progress": cfg.progress})
        except (OSError, ValueError, TypeError) as e:
            raise FoveaError(f"--resume: {run / 'train_config.json'} is missing or damaged ({e}); "
                             "start again with a new --out") from None
        before = Path(saved["data"]).expanduser()
        if Path(cfg.data).expanduser().resolve() != before.resolve():
            if before.exists():
                raise FoveaError(f"--resume: {run} was trained on {saved['data']}, not {cfg.data}; a run continues "
                                 "on its own data (a new run: another --out)")
            log.warning("--resume: %s is gone; continuing on %s", saved["data"], cfg.data)
            resumed.data = str(cfg.data)
        if cfg.model and cfg.model != saved.get("model"):
            raise FoveaError(f"--resume: {run} trains a {saved.get('model')}, not a {cfg.model}; drop --model")
        # Resume keeps the original config; only the number of epochs may be extended.
        epochs, cfg = cfg.epochs, resumed
        if epochs is not None:
            if epochs < int(saved["epochs"]):
                log.warning("--epochs %d is below the planned %s; finishing at %d", epochs, saved["epochs"], epochs)
            cfg.epochs = epochs
    elif run.exists() and any(run.iterdir()):
        raise FoveaError(f"{run} already exists and is not empty; choose another --out or add --resume")

    weights_state, weights_meta = (None, None)
    if cfg.weights:  # also on --resume: a features run's checkpoint holds only the probe, not the backbone
        weights_state, weights_meta = read_weights(cfg.weights)
        cfg = _follow_weights_run(cfg, weights_meta)
    cfg.model = cfg.model or "cnn"

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # batch shapes are fixed (drop_last): pick the fastest kernels once
    torch.manual_seed(cfg.seed)
    ds = dataset or discover(cfg.data, cfg.val_fraction, cfg.seed, group_regex=cfg.group_regex)
    source = source_of(cfg.model)
    native = default_config(cfg.model)
    user_lr = cfg.lr
    if not cfg.resume:
        cfg, why = resolve(cfg, device_type=device.type, n_train=len(ds.splits["train"]), source=source,
                           native_size=int(native["input_size"]), cpu_bf16=cpu_has_bf16())
        for k, v in why.items():
            log.info("%s: %s", k, v)
    size = int(cfg.image_size or 64)
    steps = _steps(cfg)
    # The network before the images: a bad --arch, weights that cannot be fetched or a size too small for the
    # network fail in a second, not after minutes of decoding.
    model, arch_kwargs = build_model(cfg, len(ds.classes), size)
    timings["setup"] = time.perf_counter() - clock
    clock = time.perf_counter()
    # val first, so the larger train entry is the one written to the disk cache while training runs.
    val_set = load_images(ds.splits["val"], size, cache=cfg.cache, progress=cfg.progress, description="decoding val",
                          write_behind=True, preprocess=steps)
    train_set = load_images(ds.splits["train"], size, cache=cfg.cache, progress=cfg.progress, description="decoding train",
                            write_behind=True, preprocess=steps)
    quarantined = [{"path": p, "reason": r, "split": s}
                   for s, st in (("train", train_set), ("val", val_set)) for p, r in st.quarantined]
    quarantined += [{"path": p, "reason": r, "split": "csv"} for p, r in ds.missing]
    for q in quarantined:
        log.warning("quarantined %s: %s", q["path"], q["reason"])
    if len(train_set) == 0:
        raise FoveaError("no usable training images (all quarantined); run `fovea check` on the data")
    present = set(train_set.labels.tolist())
    lost = [c for i, c in enumerate(ds.classes) if i not in present]
    if lost:
        raise FoveaError(f"class(es) with no usable training image after quarantine: {', '.join(lost)}")

    timings["decode"] = time.perf_counter() - clock
    clock = time.perf_counter()
    mean, std = tuple(native["mean"]), tuple(native["std"])
    if weights_meta is not None:  # a Fovea backbone: normalise as it was trained
        mean, std = tuple(weights_meta["preprocessing"]["mean"]), tuple(weights_meta["preprocessing"]["std"])
    transfer: dict[str, Any] = {"mode": cfg.mode}
    if cfg.weights:
        report = load_weights(model, cfg.weights, weights_state)
        log.info("weights: %s", report.summary())
        transfer["weights"] = report.to_dict()
        transfer["weights_summary"] = report.summary()
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if cfg.mode == "auto":
        shift = measure_shift(model, train_set.images, mean, std, device, cfg.seed)
        cfg.mode, freeze, decision = choose_mode(len(train_set), shift)
        cfg.freeze = freeze if cfg.freeze is None else cfg.freeze
        transfer.update(mode=cfg.mode, auto=decision)
        log.info("--mode auto chose %s: %s", cfg.mode, decision["why"])
    transfer["mode"] = cfg.mode
    assert cfg.lr is not None and cfg.optimizer is not None, "resolve() sets lr and optimizer"
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    run.mkdir(parents=True, exist_ok=True)
    callbacks: list[Callback] = [BestTracker(cfg.monitor, cfg.patience), Checkpointer(),
                                 CSVLogger(run / "history.csv"), ProgressBar(cfg.progress)]
    epochs = int(cfg.epochs or 1)
    counts = torch.bincount(train_set.labels, minlength=len(ds.classes)).float()
    # Imbalance: a loss weighted by n / (classes x n_c) (every class weighs the same in total), or a
    # sampler that draws every class equally often (rare images repeat within an epoch).
    class_weight = (counts.sum() / (len(counts) * counts.clamp_min(1))).to(device) if cfg.class_weights == "auto" else None
    sample_weights = (1.0 / counts.clamp_min(1))[train_set.labels] if cfg.sampler == "balanced" else None
    if class_weight is not None:
        log.info("class weights: %s", ", ".join(f"{c} {w:.2f}" for c, w in zip(ds.classes, class_weight.tolist())))
    trained: nn.Module = model  # what the optimizer trains: the model, or only its classifier (features mode)
    val_features = None
    lr_fn = None
    if cfg.mode == "features":
        # A linear probe on standardised embeddings (well conditioned, so it trains in seconds), folded
        # into the model's own classifier at the end: the artifact is the whole model, as for any mode.
        for p in model.parameters():
            p.requires_grad_(False)
        fkw: dict[str, Any] = {"mean": mean, "std": std, "device": device, "amp": bool(cfg.amp),
                               "channels_last": bool(cfg.channels_last), "cache": bool(cfg.cache)}
        t_feat = time.perf_counter()
        train_feats = features(model, train_set.images, **fkw)
        mu, sigma = train_feats.mean(0), train_feats.std(0).clamp_min(1e-6)
        train_feats = (train_feats - mu) / sigma
        val_features = ((features(model, val_set.images, **fkw) - mu) / sigma).to(device)
        timings["embed"] = time.perf_counter() - t_feat
        trained = nn.Linear(train_feats.shape[1], len(ds.classes)).to(device)
        if user_lr is None:
            cfg.lr = 1e-2  # a linear probe on standardised features takes a larger step than a network
        batches: Any = FeatureBatches(train_feats, train_set.labels, int(cfg.batch_size or 64), device=device,
                                      generator=generator, mean=mean, std=std, sample_weights=sample_weights)
        opt = make_optimizer(cfg.optimizer, trained, cfg.lr, float(cfg.weight_decay or 0.0))
        transfer["embedding_dim"] = int(train_feats.shape[1])
    else:
        batches = Batches(train_set.images, train_set.labels, int(cfg.batch_size or 128), device=device, mean=mean,
                          std=std, augment=str(cfg.augment), shuffle=True, drop_last=True, generator=generator,
                          channels_last=bool(cfg.channels_last), sample_weights=sample_weights)
        if cfg.mode == "finetune":
            freeze = float(cfg.freeze or 0.0)
            groups, body, frozen_norms = finetune_param_groups(model, freeze, float(cfg.weight_decay or 0.0))
            opt = make_optimizer(cfg.optimizer, model, cfg.lr, float(cfg.weight_decay or 0.0), groups=groups)
            if cfg.head_epochs is None:
                cfg.head_epochs = max(1, min(3, epochs // 5))
            callbacks.append(Freezer(model, body, frozen_norms, cfg.head_epochs))
            lr_fn = two_phase_lr(len(batches) * epochs, len(batches) * cfg.head_epochs, cfg.lr, cfg.schedule)
            n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
            transfer.update(freeze=freeze, head_epochs=cfg.head_epochs, frozen_parameters=n_frozen,
                            trainable_parameters=sum(p.numel() for p in model.parameters()) - n_frozen)
        else:
            opt = make_optimizer(cfg.optimizer, model, cfg.lr, float(cfg.weight_decay or 0.0))
    fit = Fit(cfg, run, trained, opt, batches, val_set, device, generator, callbacks, steps_per_epoch=len(batches),
              val_images=val_set.images.to(device), val_features=val_features, lr_fn=lr_fn)
    if cfg.resume:
        try:
            state, fit.best_state = load_checkpoint(run, model=trained, optimizer=opt, generator=generator)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
            raise FoveaError(f"--resume: the checkpoint in {run} is damaged or incomplete "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); start again with a "
                             "new --out") from None
        fit.epoch, fit.step, fit.history = state["epoch"], state["step"], state["history"]
        fit.best_score, fit.best_epoch = state["best_score"], state["best_epoch"]
        log.info("resuming %s at epoch %d of %d", run, fit.epoch, cfg.epochs)
    (run / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    net: Any = torch.compile(trained) if cfg.compile else trained
    mixer = None
    if (cfg.mixup or cfg.cutmix) and cfg.mode != "features":
        from timm.data import Mixup

        np.random.seed(cfg.seed)  # timm's Mixup draws lambda from numpy's global generator
        mixer = Mixup(mixup_alpha=float(cfg.mixup or 0), cutmix_alpha=float(cfg.cutmix or 0), switch_prob=0.5,
                      label_smoothing=cfg.label_smoothing, num_classes=len(ds.classes))
    elif cfg.mixup or cfg.cutmix:
        log.warning("mixup/cutmix mix images; --mode features trains on fixed embeddings, so they are off")
    l1_params = [p for p in trained.parameters() if p.ndim > 1]

    def step_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(device, bool(cfg.amp)):
            if mixer is not None:
                x, soft = mixer(x, y)  # soft targets carry the label smoothing
                logits = net(x)
                loss = F.cross_entropy(logits.float(), soft, weight=class_weight)
            else:
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y, weight=class_weight, label_smoothing=cfg.label_smoothing)
        if cfg.l1:
            loss = loss + cfg.l1 * sum(p.abs().sum() for p in l1_params if p.requires_grad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss, logits

    timings["model"] = time.perf_counter() - clock
    t0 = time.perf_counter()
    fit.fire("before_fit")
    while fit.epoch < int(cfg.epochs or 1) and not fit.stop:
        run_epoch(fit, step_fn)
        fit.epoch += 1
    fit.fire("after_fit")
    timings["train"] = time.perf_counter() - t0
    for cb in callbacks:
        if isinstance(cb, Checkpointer):
            timings.update(cb.seconds)  # how much of "train" the checkpoints held the training thread
    if fit.best_state is not None:
        trained.load_state_dict(fit.best_state)
    if cfg.mode == "features":
        assert isinstance(trained, nn.Linear)
        fold_probe(model, trained, mu.to(device), sigma.to(device))
    fit.model, fit.val_features = model, None
    for p in model.parameters():
        p.requires_grad_(True)
    return _finish(fit, ds, train_set, val_set, quarantined, arch_kwargs, mean, std, native, timings, transfer)


def _finish(fit: Fit, ds: Any, train_set: ImageSet, val_set: ImageSet, quarantined: list[dict[str, str]],
            arch_kwargs: dict[str, Any], mean: tuple[float, ...], std: tuple[float, ...], native: dict[str, Any],
            timings: dict[str, float], transfer: dict[str, Any]) -> Path:
    """Final validation metrics, the artifact, metrics.json and report.html."""
    from fovea.evaluation import classification_metrics, diagnose, write_report
    from fovea.explain import looks_at

    cfg, run = fit.cfg, fit.run
    clock = time.perf_counter()
    logits = evaluate_logits(fit, tta=cfg.tta)
    metrics = classification_metrics(val_set.labels.numpy(), logits.softmax(1).numpy(), ds.classes) if len(val_set) else {}
    metrics.update({"best_epoch": fit.best_epoch, "epochs_run": len(fit.history), "train_seconds": round(timings["train"], 2),
                    "n_train": len(train_set), "n_val": len(val_set), "skipped": len(quarantined)})
    last = fit.history[-1] if fit.history else {}
    metrics["final_train_acc"] = last.get("train_acc")
    if len(val_set):
        # Training error for the bias/variance diagnosis: the final weights on the training images, no
        # augmentation, evaluated exactly like validation.
        train_logits = infer(fit.model, train_set.images, mean=fit.batches.mean, std=fit.batches.std, device=fit.device,
                             amp=bool(cfg.amp), tta=cfg.tta, channels_last=bool(cfg.channels_last))
        metrics["train_accuracy"] = float((train_logits.argmax(1) == train_set.labels).float().mean())
        metrics["diagnosis"] = diagnose(1 - metrics["train_accuracy"], 1 - metrics["accuracy"], cfg.human_error)
    meta = {
        "architecture": {"name": cfg.model, "kwargs": arch_kwargs},
        "classes": ds.classes,
        "preprocessing": {"image_size": int(cfg.image_size or 64), "resize": "shorter side, then centre crop",
                          "mean": list(mean), "std": list(std), "interpolation": "bilinear",
                          "alpha": "composited on white", "tta": cfg.tta, "color": "RGB",
                          "steps": [s.to_dict() for s in _steps(cfg)]},  # fovea.ops, after the resize
        "training": cfg.to_dict(),
        "transfer": transfer,
        "metrics": {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "roc_curves", "per_class")},
        "data": {"root": ds.root, "layout": ds.layout, "fingerprint": ds.fingerprint(),
                 "counts": ds.counts(), "quarantined": len(quarantined)},
    }
    save_artifact(run, fit.model, meta)
    if len(val_set):
        _save_reference(run, val_set, fit.device)
    looks = looks_at(fit.model, val_set.images, val_set.labels.numpy(), logits.softmax(1).numpy(), ds.classes,
                     val_set.paths, mean=mean, std=std) if len(val_set) else None
    write_report(run / "report.html", title=f"{cfg.model} on {Path(cfg.data).name}", meta=meta, metrics=metrics,
                 history=fit.history, quarantined=quarantined, explanations=looks)
    timings["finish"] = time.perf_counter() - clock
    metrics["timings"] = {k: round(v, 2) for k, v in timings.items()}
    log.info("seconds: %s", ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    (run / "metrics.json").write_text(json.dumps({**metrics, "quarantined": quarantined}, indent=2, default=float))
    log.info("run folder: %s", run)
    return run


def _save_reference(run: Path, val_set: ImageSet, device: torch.device) -> None:
    """reference.npz beside the weights: what the validation images looked like to the saved artifact (through
    ``fovea.load``, as serving will see them), for ``fovea drift``."""
    from fovea.artifact import load
    from fovea.monitor import build_reference, header_size, save_reference

    clock = time.perf_counter()
    model = load(run, str(device))
    sizes = [header_size(p) for p in val_set.paths]
    save_reference(run, build_reference(model, val_set.images, sizes, val_set.labels.numpy()))
    log.info("drift reference: %d validation images in %.1f s", min(len(val_set), 2000), time.perf_counter() - clock)


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]
