"""One training run: data -> cached uint8 tensors on the device -> one short loop -> a run folder."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from fovea._system import cpu_has_bf16
from fovea.data import Dataset, choose_store, corrected, discover, load_images
from fovea.errors import FoveaError
from fovea.models import check_input_size, create_model, default_config, source_of
from fovea.models.backbone import fold_probe, load_weights, read_weights
from fovea.runtime import autocast, pick_device
from fovea.training._callbacks import BestTracker, Checkpointer, CSVLogger, ProgressBar, TimeBudget
from fovea.training._checkpoint import has_checkpoint, load_checkpoint
from fovea.training._config import TrainConfig, preprocess_steps, resolve
from fovea.training._ddp import Distributed, barrier, device_of, join, share
from fovea.training._finish import finish
from fovea.training._fit import Callback, Fit
from fovea.training._modes import (
    FeatureBatches,
    Freezer,
    choose_mode,
    features,
    finetune_param_groups,
    measure_shift,
    two_phase_lr,
)
from fovea.training._schedule import lr_at

log = logging.getLogger("fovea.training")
# The end of a run beyond its forward passes (Grad-CAM of a few images, the report's plots, writing files), and
# the share of a time budget kept in reserve (process exit, printing, a slower minute): measured on pets, 2 cores.
REPORT_SECONDS = 6.0
BUDGET_MARGIN = 0.02


def logit_norm(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """What the loss sees with --logit-norm tau (LogitNorm, Wei et al. 2022): the logits scaled to norm 1 / tau;
    tau 0: the logits themselves."""
    return logits / (logits.norm(dim=-1, keepdim=True).clamp_min(1e-7) * tau) if tau else logits


class RotationTask(nn.Module):
    """--rotation-aux: each image of a batch is turned by a random multiple of 90 degrees and a linear head on the
    model's embedding (timm's ``forward_head(..., pre_logits=True)``) predicts which; ``forward`` is that
    prediction's cross-entropy (Hendrycks et al. 2019, "Using self-supervised learning can improve model
    robustness and uncertainty"). One turn per image, not all four as in the paper: a CPU pays for every image.
    The head is not part of the artifact, nor of a checkpoint: on --resume it starts again from random weights."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        dim = getattr(model, "num_features", None)
        if not isinstance(dim, int) or not hasattr(model, "forward_head"):
            raise FoveaError(f"--rotation-aux needs a model with an embedding (timm's forward_head); "
                             f"{type(model).__name__} has none")
        self.model = [model]  # not a submodule: its parameters are the model's, optimised there
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model: Any = self.model[0]
        turns = torch.randint(0, 4, (len(x),), device=x.device)
        turned = torch.empty_like(x)
        for k in range(4):
            pick = turns == k
            turned[pick] = torch.rot90(x[pick], k, (2, 3))
        emb = model.forward_head(model.forward_features(turned), pre_logits=True)
        return F.cross_entropy(self.head(emb).float(), turns)


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


def run_epoch(fit: Fit, step_fn: Any) -> None:
    """One pass over the training data, then validation; appends a history row."""
    cfg = fit.cfg
    fit.model.train()
    fit.epoch_start = time.perf_counter()
    peak = cfg.lr
    assert peak is not None, "resolve() sets the learning rate"
    loss_sum = torch.zeros((), device=fit.device)
    correct = torch.zeros((), device=fit.device)
    norm_sum = torch.zeros((), device=fit.device)  # the gradient's global L2 norm, before --clip-grad
    norm_max = torch.zeros((), device=fit.device)
    seen = steps = 0
    fit.running = {}
    fit.fire("before_epoch")
    lr_of = fit.lr_fn or (lambda step, total: lr_at(step, total, peak, cfg.schedule))
    for x, y in fit.batches:
        lr = lr_of(fit.step, fit.total_steps())
        for g in fit.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # discriminative learning rates when fine-tuning
        loss, logits, grad_norm = step_fn(x, y)
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        norm_sum += grad_norm
        norm_max = torch.maximum(norm_max, grad_norm)  # NaN propagates: a step that blew up shows
        seen += len(y)
        steps += 1
        fit.step += 1
        # Reading the running loss syncs the GPU and stops the CPU queueing work ahead: every 10th step at most.
        if fit.step % max(10, fit.steps_per_epoch // 10) == 0:
            fit.running = {"loss": float(loss_sum) / seen, "acc": float(correct) / seen, "seen": seen}
        fit.fire("after_batch")
    if fit.device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - fit.epoch_start
    logits = fit.val_logits() if fit.main else torch.zeros(0, 0)  # rank 0 alone evaluates
    fit.val_seconds = time.perf_counter() - fit.epoch_start - train_seconds
    evaluated = bool(len(fit.val)) and fit.main
    val_loss = F.cross_entropy(logits, fit.val.labels).item() if evaluated else float("nan")
    val_acc = (logits.argmax(1) == fit.val.labels).float().mean().item() if evaluated else float("nan")
    fit.history.append({
        "epoch": fit.epoch + 1, "lr": lr_of(fit.step - 1, fit.total_steps()),
        "train_loss": float(loss_sum) / max(seen, 1), "train_acc": float(correct) / max(seen, 1),
        "val_loss": val_loss, "val_acc": val_acc,
        "grad_norm": float(norm_sum) / max(steps, 1), "grad_norm_max": float(norm_max),
        "images_per_s": seen * fit.world / max(train_seconds, 1e-9), "seconds": time.perf_counter() - fit.epoch_start,
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


def default_out(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(cfg.data).stem}-{cfg.model or Path(str(cfg.weights)).name}-{stamp}"


def train_one(cfg: TrainConfig, dataset: Dataset | None = None, deadline: float | None = None) -> Path:
    """One run. ``dataset``: an already split data set (a fold, or the split shared by --seeds runs);
    ``deadline``: a ``time.time()`` by which it should end (None: its own ``cfg.time`` from now, if any)."""
    started = time.time()
    run = Path(cfg.out) if cfg.out else default_out(cfg)
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
        # Resume keeps the original config (and the epochs a time budget planned); only the number of epochs may
        # be extended.
        epochs, cfg = cfg.epochs, resumed
        if epochs is not None:
            if epochs < int(saved["epochs"]):
                log.warning("--epochs %d is below the planned %s; finishing at %d", epochs, saved["epochs"], epochs)
            cfg.epochs = epochs
    elif run.exists() and any(run.iterdir()):
        raise FoveaError(f"{run} already exists and is not empty; choose another --out or add --resume")
    group = join(cfg.device)  # torchrun's processes (a plain run: rank 0 of 1)
    barrier(group)  # every process has checked the run folder before rank 0 writes to it

    weights_state, weights_meta = (None, None)
    if cfg.weights:  # also on --resume: a features run's checkpoint holds only the probe, not the backbone
        weights_state, weights_meta = read_weights(cfg.weights)
        cfg = _follow_weights_run(cfg, weights_meta)
    cfg.model = cfg.model or "cnn"

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    device = device_of(group, pick_device(cfg.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # batch shapes are fixed (drop_last): pick the fastest kernels once
    torch.manual_seed(cfg.seed)
    ds = dataset or corrected(discover(cfg.data, cfg.val_fraction, cfg.seed, group_regex=cfg.group_regex),
                              cfg.corrections)
    source = source_of(cfg.model)
    native = default_config(cfg.model)
    user_lr, user_epochs, user_time = cfg.lr, cfg.epochs, cfg.time
    if not cfg.resume:
        cfg, why = resolve(cfg, device_type=device.type, n_train=len(ds.splits["train"]), source=source,
                           native_size=int(native["input_size"]), cpu_bf16=cpu_has_bf16())
        for k, v in why.items():
            log.info("%s: %s", k, v)
    if group.active:
        if int(cfg.batch_size or 0) % group.world:
            raise FoveaError(f"--batch-size {cfg.batch_size} is the global batch: it must split evenly over the "
                             f"{group.world} processes")
        log.info("distributed: %d processes (%s); global batch %d = %d x %d per process; learning rate %g, set for "
                 "the global batch", group.world, group.backend, cfg.batch_size, group.world,
                 int(cfg.batch_size or 0) // group.world, cfg.lr)
    size = int(cfg.image_size or 64)
    steps = preprocess_steps(cfg)
    # The network before the images: a bad --arch, weights that cannot be fetched or a size too small for the
    # network fail in a second, not after minutes of decoding.
    model, arch_kwargs = build_model(cfg, len(ds.classes), size)
    timings["setup"] = time.perf_counter() - clock
    clock = time.perf_counter()
    n_images = len(ds.splits["train"]) + len(ds.splits["val"])
    store, store_why = share(group, choose_store(cfg.cache, n_images, size, device, copies=group.local_world))
    log.info("images: %s", store_why)
    # Distributed: each machine's first process decodes and writes the cache entry; the others then read it.
    if group.local_rank != 0:
        barrier(group)
    decode = {"cache": cfg.keeps_cache, "progress": cfg.progress and group.main, "write_behind": not group.active,
              "preprocess": steps, "store": store}
    # val first, so the larger train entry is the one written to the disk cache while training runs.
    val_set = load_images(ds.splits["val"], size, description="decoding val", **decode)
    train_set = load_images(ds.splits["train"], size, description="decoding train", **decode)
    if group.local_rank == 0:
        barrier(group)
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
    if native.get("kind") == "classical":  # handcrafted features + scikit-learn: fitted in one pass, no loop
        from fovea.training._classical import train_classical

        if not group.main:
            return run  # one fit, by rank 0: there are no gradients to share

        return train_classical(cfg, run, ds, train_set, val_set, quarantined, arch_kwargs, native, timings, device)
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
                                 CSVLogger(run / "history.csv"), ProgressBar(cfg.progress)] if group.main else []
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
                               "channels_last": bool(cfg.channels_last), "cache": cfg.keeps_cache}
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
        # Distributed: the same order on every process (``generator``), its own augmentation draws.
        augment_generator = torch.Generator(device=device) if group.active else None
        bkw: dict[str, Any] = {"device": device, "mean": mean, "std": std, "augment": str(cfg.augment), "shuffle": True,
                               "drop_last": True, "generator": generator, "channels_last": bool(cfg.channels_last),
                               "sample_weights": sample_weights, "shard": (group.rank, group.world),
                               "augment_generator": augment_generator}
        batches = train_set.batches(int(cfg.batch_size or 128), **bkw)  # read from its file when on disk
        if cfg.mode == "finetune":
            freeze = float(cfg.freeze or 0.0)
            groups, body, frozen_norms = finetune_param_groups(model, freeze, float(cfg.weight_decay or 0.0))
            opt = make_optimizer(cfg.optimizer, model, cfg.lr, float(cfg.weight_decay or 0.0), groups=groups)
            if cfg.head_epochs is None:
                cfg.head_epochs = max(1, min(3, epochs // 5))
            callbacks.append(Freezer(model, body, frozen_norms, cfg.head_epochs))
            lr_fn = two_phase_lr(len(batches) * cfg.head_epochs, cfg.lr, cfg.schedule)
            n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
            transfer.update(freeze=freeze, head_epochs=cfg.head_epochs, frozen_parameters=n_frozen,
                            trainable_parameters=sum(p.numel() for p in model.parameters()) - n_frozen)
        else:
            opt = make_optimizer(cfg.optimizer, model, cfg.lr, float(cfg.weight_decay or 0.0))
    rotation = None
    if cfg.rotation_aux and cfg.mode == "features":
        log.warning("--rotation-aux trains the network's embedding; --mode features keeps it fixed, so it is off")
    elif cfg.rotation_aux:
        if group.active:
            raise FoveaError("--rotation-aux does not run under torchrun yet: train in one process")
        rotation = RotationTask(model).to(device)
        opt.add_param_group({"params": list(rotation.head.parameters()), "weight_decay": float(cfg.weight_decay or 0)})
    fit = Fit(cfg, run, trained, opt, batches, val_set, device, generator, callbacks, steps_per_epoch=len(batches),
              val_images=val_set.images if val_set.on_disk else val_set.images.to(device), val_features=val_features,
              lr_fn=lr_fn, main=group.main, world=group.world)
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
    if group.active:
        torch.manual_seed(cfg.seed + 7919 * group.rank)  # dropout: each process its own draws
        if cfg.mode != "features":
            batches.augment_generator.manual_seed(cfg.seed + 1_000_003 * (group.rank + 1) + fit.epoch)

    def save_config(fit: Fit | None = None) -> None:  # what --resume reads back, with the epochs planned so far
        if not group.main:
            return
        tmp = run / "train_config.json.tmp"
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
        tmp.replace(run / "train_config.json")

    save_config()
    if deadline is None and cfg.time is not None and not cfg.resume:
        deadline = started + cfg.time
    if deadline is not None and not cfg.resume and group.main:
        embed_per_image = timings.get("embed", 0.0) / max(len(train_set) + len(val_set), 1)

        def finish_seconds(fit: Fit, fwd_per_image: float) -> float:
            """What the end of the run takes: validation and training images evaluated with TTA, once more to fit
            and calibrate the unknown score, the drift reference (one more pass over validation), then Grad-CAM
            and the report (REPORT_SECONDS)."""
            fwd = max(fwd_per_image, embed_per_image)  # features mode times the head alone per epoch
            tta = 2 if cfg.tta else 1
            passes = 2 if cfg.unknown_keep > 0 else 1
            return fwd * tta * (passes * (len(val_set) + len(train_set)) + min(len(val_set), 2000)) + REPORT_SECONDS

        # the user's --epochs is the most a budget may run; the default budget keeps the data-size rule as its cap
        cap = user_epochs if user_epochs is not None else (cfg.epochs if user_time is None else None)
        # first: the progress bar and the checkpoint see the epochs it planned
        end = time.monotonic() + (deadline - time.time()) - BUDGET_MARGIN * (deadline - started)
        callbacks.insert(0, TimeBudget(end, cap, finish_seconds, save_config))
    elif cfg.resume and cfg.time is not None:
        log.info("resuming the %d epochs the time budget planned", cfg.epochs)

    spread = Distributed(group, trained, device) if group.active else None
    if spread is not None:
        callbacks.append(spread)  # last: it hands rank 0's decisions to the others
        if cfg.mode == "features":
            log.info("--mode features trains a linear head on cached embeddings: each process trains it whole")
    if cfg.compile and spread is not None:
        log.warning("--compile is off under torchrun (DistributedDataParallel re-wraps the model when it unfreezes)")
    plain: Any = torch.compile(trained) if cfg.compile and spread is None else trained

    def net(x: torch.Tensor) -> torch.Tensor:
        return (spread.net if spread is not None else plain)(x)
    mixer = None
    if (cfg.mixup or cfg.cutmix) and cfg.mode != "features":
        from timm.data import Mixup

        np.random.seed(cfg.seed)  # timm's Mixup draws lambda from numpy's global generator
        mixer = Mixup(mixup_alpha=float(cfg.mixup or 0), cutmix_alpha=float(cfg.cutmix or 0), switch_prob=0.5,
                      label_smoothing=cfg.label_smoothing, num_classes=len(ds.classes))
    elif cfg.mixup or cfg.cutmix:
        log.warning("mixup/cutmix mix images; --mode features trains on fixed embeddings, so they are off")
    l1_params = [p for p in trained.parameters() if p.ndim > 1]

    def step_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with autocast(device, bool(cfg.amp)):
            if mixer is not None:
                x, soft = mixer(x, y)  # soft targets carry the label smoothing
                logits = net(x)
                loss = F.cross_entropy(logit_norm(logits.float(), cfg.logit_norm), soft, weight=class_weight)
            else:
                logits = net(x)
                loss = F.cross_entropy(logit_norm(logits.float(), cfg.logit_norm), y, weight=class_weight,
                                       label_smoothing=cfg.label_smoothing)
            if rotation is not None:
                loss = loss + cfg.rotation_aux * rotation(x)
        if cfg.l1:
            loss = loss + cfg.l1 * sum(p.abs().sum() for p in l1_params if p.requires_grad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # The gradient's norm every step (history.csv's grad_norm: vanishing or exploding gradients show), and
        # with --clip-grad the gradient rescaled to at most that norm (Pascanu et al. 2013), as the course's RNNs
        # need. One fused norm over all parameters; no host sync.
        grads = [p.grad for p in trained.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads).detach() if grads else torch.zeros((), device=device)
        if cfg.clip_grad:
            torch.nn.utils.clip_grads_with_norm_([p for p in trained.parameters() if p.grad is not None],
                                                 cfg.clip_grad, grad_norm)
        opt.step()
        return loss, logits, grad_norm

    timings["model"] = time.perf_counter() - clock
    t0 = time.perf_counter()
    fit.fire("before_fit")
    while fit.epoch < int(cfg.epochs or 1) and not fit.stop:
        run_epoch(fit, step_fn)
        fit.epoch += 1
    fit.fire("after_fit")
    timings["train"] = time.perf_counter() - t0
    if not group.main:
        return run  # rank 0 writes the artifact and the report
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
    return finish(fit, ds, train_set, val_set, quarantined, arch_kwargs, mean, std, native, timings, transfer)
