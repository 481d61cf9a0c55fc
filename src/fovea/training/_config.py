"""Training configuration: every knob typed, every non-obvious default with its reason."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fovea._duration import parse_duration
from fovea.errors import FoveaError

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("onecycle", "cosine", "constant")
MODES = ("scratch", "features", "finetune", "auto")
CLASS_WEIGHTS = ("none", "auto")
SAMPLERS = ("shuffle", "balanced")


@dataclass
class TrainConfig:
    data: str
    model: str | None = None  # None: cnn, or the architecture of a --weights run folder
    image_size: int | None = None  # None: the model's own size (cnn: 64 on CPU, 96 on GPU; timm: its cfg)
    # fovea.ops steps after the resize, e.g. "gray,clahe" (a string or a list); recorded in model.json, so
    # predict, evaluate and serve apply them from the artifact alone. Empty: none.
    preprocess: str | tuple[str, ...] = ()
    epochs: int | None = None  # None: chosen from the model, data size and device (see resolve)
    # A time budget in seconds for the whole run (--time 5m): the number of epochs is set from the speed measured
    # in the first steps, so the one-cycle schedule ends on time. With --epochs too, those are the most it runs.
    # None: on a CPU, when --epochs is not given, DEFAULT_CPU_TIME (a good model in ~5 minutes on any laptop:
    # epochs from the data size alone took 7.4 min on a 2-core CPU without native bf16); no budget on a GPU.
    time: float | None = None
    batch_size: int | None = None  # None: 64 for < 1000 images (halved down to 8 for < 512), else 128 CPU / 256 GPU
    lr: float | None = None  # None: per optimizer (sgd 0.1 x batch/256... see resolve)
    optimizer: str | None = None  # None: sgd+nesterov for mlp/cnn (best from scratch), adamw otherwise
    weight_decay: float | None = None  # None: 5e-4 for sgd, 0.05 for adamw
    schedule: str = "onecycle"  # one-cycle (Smith 2018) trains fastest in a fixed budget
    label_smoothing: float = 0.1  # cheap calibration + regularization on small data
    # LogitNorm (Wei et al. 2022): the loss sees logits / (||logits|| x tau), so training cannot lower it by
    # growing the logits' norm, which makes every input look confident; tau ~0.04 in the paper. 0: off. Not a
    # default: at 0.04 the pets cnn (60 epochs) fell from 87.5 % to 73.7 % and its unknown-image AUROC on
    # ants/bees from 0.854 to 0.737 (docs/unknown.md, "Training-time regularisers").
    logit_norm: float = 0.0
    # A self-supervised rotation task (Hendrycks et al. 2019): a 4-way head on the embedding predicts how a rotated
    # copy of each training image was turned; its cross-entropy x this weight joins the loss. 0: off.
    rotation_aux: float = 0.0
    augment: str | None = None  # None: "standard" (random resized crop + flip)
    mixup: float | None = None  # mixup Beta(alpha) (Zhang et al. 2018); None: 0.8 with --augment strong, else off
    cutmix: float | None = None  # cutmix Beta(alpha) (Yun et al. 2019); None: 1.0 with --augment strong, else off
    l1: float = 0.0  # L1 penalty on weights (not biases/norms), added to the loss: sparse weights
    # Rescale the gradient to at most this global L2 norm before each step (Pascanu et al. 2013): what keeps a
    # recurrent network's exploding gradients from throwing it out of its basin. None: off (the norm is still
    # recorded per epoch in history.csv, so vanishing or exploding gradients show).
    clip_grad: float | None = None
    class_weights: str = "none"  # auto: loss weighted by n / (classes x n_class), for imbalanced data
    sampler: str = "shuffle"  # balanced: draw every class equally often (oversampling, with replacement)
    human_error: float | None = None  # human-level error, for the bias/variance diagnosis (None: taken as 0)
    # People's verdicts on suspected label errors (fovea check --labels, then the review queue): None reads the
    # data set's corrections file in FOVEA_HOME when there is one; "none" ignores it; or a file's path.
    corrections: str | None = None
    group_regex: str | None = None  # group = this regex's first group (or match) on the file name
    folds: int | None = None  # K-fold cross-validation: K runs on pooled train+val, mean +- spread
    seeds: int = 1  # train N models (seeds seed..seed+N-1) on one split and ensemble them
    tta: bool = True  # average the prediction of the image and its mirror: +0.5-1 point, 2x eval cost
    # Images of none of the classes answer "unknown": a score fitted on the training images, its threshold set to
    # keep this share of the validation images (0: closed-set, no score); see fovea.runtime.unknown.
    unknown_keep: float = 0.95
    unknown_score: str | None = None  # None: fovea.runtime.unknown.DEFAULT_SCORE (chosen by bench/unknown.py)
    dropout: float | None = None  # None: the architecture's default
    pretrained: bool | None = None  # None: timm hub weights for timm architectures, none for ours
    weights: str | None = None  # a weights file (.safetensors/.pth/.pt) or a Fovea run folder
    mode: str | None = None  # scratch | features | finetune | auto; None: auto with weights, else scratch
    freeze: float | None = None  # finetune: share of the backbone frozen from the input side (None: auto's, or 0)
    head_epochs: int | None = None  # finetune: epochs training only the head first (None: 1-3)
    device: str = "auto"
    amp: bool | None = None  # None: bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16/AMX)
    channels_last: bool | None = None  # None: on for CUDA and for CPU bf16 (oneDNN's fast layout)
    compile: bool = False  # torch.compile: faster on GPU for long runs, but ~1 min of start-up
    patience: int | None = None  # early stopping; None: off for one-cycle (its end is the best part)
    monitor: str = "val_acc"  # val_acc | val_loss: keep the best epoch's weights; last: the final weights
    val_fraction: float = 0.2
    seed: int = 0
    out: str | None = None
    resume: bool = False
    cache: str = "auto"  # auto | memory | disk | none (fovea.data.STORE_CHOICES); True/False: auto/none (older runs)
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # architecture kwargs (e.g. widths)

    def __post_init__(self) -> None:
        if isinstance(self.cache, bool):  # the Python API's and older train_config.json's cache=True/False
            self.cache = "auto" if self.cache else "none"

    @property
    def keeps_cache(self) -> bool:
        """Whether decoded images are kept in (and read from) $FOVEA_HOME/cache."""
        return self.cache != "none"

    def validate(self) -> None:
        from fovea.data import AUGMENTATIONS  # with the loader, which needs torch: not at import

        def bad(name: str, value: object, allowed: tuple[str, ...]) -> None:
            raise FoveaError(f"--{name} {value!r} is not one of: {', '.join(allowed)}")

        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            bad("optimizer", self.optimizer, OPTIMIZERS)
        if self.schedule not in SCHEDULES:
            bad("schedule", self.schedule, SCHEDULES)
        if self.augment is not None and self.augment not in AUGMENTATIONS:
            bad("augment", self.augment, AUGMENTATIONS)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            bad("device", self.device, ("auto", "cpu", "cuda"))
        if self.mode is not None and self.mode not in MODES:
            bad("mode", self.mode, MODES)
        if self.mode == "scratch" and (self.pretrained or self.weights):
            given = "--pretrained" if self.pretrained else f"--weights {self.weights}"
            raise FoveaError(f"--mode scratch starts from random weights, so {given} contradicts it; drop one of them")
        if self.freeze is not None and not 0 <= self.freeze <= 1:
            raise FoveaError(f"--freeze must be a fraction in [0, 1], got {self.freeze}")
        if self.class_weights not in CLASS_WEIGHTS:
            bad("class-weights", self.class_weights, CLASS_WEIGHTS)
        if self.sampler not in SAMPLERS:
            bad("sampler", self.sampler, SAMPLERS)
        for name in ("mixup", "cutmix"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise FoveaError(f"--{name} must be >= 0 (a Beta distribution's alpha; 0 turns it off), got {v}")
        if self.folds is not None and self.folds < 2:
            raise FoveaError(f"--folds needs at least 2, got {self.folds}")
        if self.seeds < 1:
            raise FoveaError(f"--seeds must be at least 1, got {self.seeds}")
        if self.folds and self.seeds > 1:
            raise FoveaError("--folds and --seeds each train several models; use one of them")
        if self.resume and (self.folds or self.seeds > 1):
            raise FoveaError("--resume continues one run: give one fold's or seed's folder, e.g. --out OUT/fold-1 --resume")
        if self.l1 < 0:
            raise FoveaError(f"--l1 must be >= 0, got {self.l1}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise FoveaError(f"--clip-grad is the largest gradient norm allowed, so > 0, got {self.clip_grad}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise FoveaError(f"--dropout is a probability in [0, 1), got {self.dropout}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise FoveaError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.patience is not None and self.patience < 1:
            raise FoveaError(f"--patience is a number of epochs, at least 1, got {self.patience}")
        if self.image_size is not None and self.image_size > 2048:
            raise FoveaError(f"--image-size {self.image_size} is over 2048 px; images are cached at that size, "
                             "so it would need gigabytes per hundred images")
        if not 0 <= self.unknown_keep < 1:
            raise FoveaError(f"--unknown-keep is the share of known images to keep, in [0, 1) (0: no unknown score), "
                             f"got {self.unknown_keep}")
        if self.unknown_score is not None:
            from fovea.runtime.unknown import create_score

            create_score(self.unknown_score)  # a misspelt name fails now, with "did you mean", not after training
        if self.human_error is not None and not 0 <= self.human_error < 1:
            raise FoveaError(f"--human-error is an error rate in [0, 1), got {self.human_error}")
        if self.group_regex is not None:
            import re

            try:
                re.compile(self.group_regex)
            except re.error as e:
                raise FoveaError(f"--group-regex {self.group_regex!r} is not a valid regular expression: {e}") from e
        if self.preprocess and self.preprocess != "none":
            from fovea.ops import parse_steps

            try:
                parse_steps(self.preprocess)
            except FoveaError as e:
                raise FoveaError(f"--preprocess {self.preprocess!r}: {e}") from e
        if self.cache not in ("auto", "memory", "disk", "none"):
            bad("cache", self.cache, ("auto", "memory", "disk", "none"))
        if self.monitor not in ("val_acc", "val_loss", "last"):
            bad("monitor", self.monitor, ("val_acc", "val_loss", "last"))
        if self.time is not None and not 0 < self.time <= 30 * 86400:
            raise FoveaError(f"--time must be positive and at most 30 days, got {self.time:g} s")
        for name in ("image_size", "epochs", "batch_size"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise FoveaError(f"--{name.replace('_', '-')} must be positive, got {v}")
        if self.lr is not None and not 0 < self.lr < 10:
            raise FoveaError(f"--lr must be in (0, 10), got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise FoveaError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.logit_norm < 0:
            raise FoveaError(f"--logit-norm is LogitNorm's temperature tau (e.g. 0.04; 0 turns it off), so >= 0, "
                             f"got {self.logit_norm}")
        if self.rotation_aux < 0:
            raise FoveaError(f"--rotation-aux is the rotation task's weight in the loss (e.g. 0.5; 0 turns it off), so "
                             f">= 0, got {self.rotation_aux}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


@dataclass(frozen=True)
class Option:
    """How a ``TrainConfig`` field reads on the command line: ``fovea train``, ``lr-find`` and ``compare`` build
    their options from ``OPTIONS``, so each is declared once, beside the field it sets."""

    help: str
    flags: tuple[str, ...] = ()  # when not --NAME (a --x/--no-x switch, say)
    type: Any = None  # the command line's type, when not the field's (e.g. a string for a list field)
    parser: Callable[[str], Any] | None = None
    metavar: str | None = None


_SIZE = "Square input size in px (default: per model and device)."
OPTIONS: dict[str, Option] = {
    "model": Option("Architecture: mlp, cnn, any timm name, alexnet, googlenet (`fovea models`); default cnn, or the "
                    "--weights run's."),
    "weights": Option("Start from these weights: a .safetensors/.pth/.pt file or a Fovea run folder."),
    "pretrained": Option("timm hub weights (default for timm architectures, except with --mode scratch; needs the "
                         "network).", ("--pretrained/--no-pretrained",)),
    "mode": Option("scratch | features | finetune | auto (default: auto with weights, else scratch)."),
    "freeze": Option("finetune: share of the backbone frozen from the input side (0-1)."),
    "head_epochs": Option("finetune: epochs training only the new head first (default 1-3)."),
    "image_size": Option(_SIZE),
    "preprocess": Option("Classical operations applied to every image after the resize, e.g. gray,clahe or "
                         "gray,clahe:clip=3 (`fovea ops list`); recorded in the model, so predict and serve apply "
                         "them too. A --weights run's steps are kept unless you give others or `none`.", type=str | None),
    "epochs": Option("Epochs (default: from data size and device; with --time, the most it runs)."),
    "time": Option("Time for the whole command (90s, 5m, 1h): the epochs are fitted to this machine's measured "
                   "speed so the schedule ends on time. Default on a CPU without --epochs: 5m.",
                   parser=parse_duration, metavar="DURATION"),
    "batch_size": Option("Batch size."),
    "lr": Option("Peak learning rate."),
    "optimizer": Option("sgd | adam | adamw | rmsprop"),
    "weight_decay": Option("L2 weight decay."),
    "schedule": Option("onecycle | cosine | constant"),
    "label_smoothing": Option("Label smoothing."),
    "logit_norm": Option("LogitNorm: the loss sees the logits divided by their L2 norm x this temperature (e.g. "
                         "0.04; 0 off), so unfamiliar images are not scored as confidently (Wei et al. 2022)."),
    "rotation_aux": Option("Weight of a self-supervised task in the loss: a small head predicts how a rotated copy "
                           "of each image was turned (Hendrycks et al. 2019; 0 off). About doubles the step's cost.",
                           metavar="W"),
    "augment": Option("none | flip | light (translate+flip) | standard (random resized crop+flip) | strong (+rotation, "
                      "colour jitter, random erasing, mixup/cutmix)"),
    "mixup": Option("Mixup alpha (0 off; default 0.8 with --augment strong)."),
    "cutmix": Option("CutMix alpha (0 off; default 1.0 with --augment strong)."),
    "l1": Option("L1 penalty on weights, added to the loss."),
    "clip_grad": Option("Rescale each step's gradient to at most this L2 norm (e.g. 1.0; recurrent models need it "
                        "at high learning rates). The norm per epoch is in history.csv either way.",
                        metavar="NORM"),
    "class_weights": Option("none | auto (loss weighted against imbalance)"),
    "sampler": Option("shuffle | balanced (oversample rare classes)"),
    "group_regex": Option("Group (patient, source) = this regex's first group on the file name; splits keep groups "
                          "whole."),
    "corrections": Option("A corrections file (path,action,label: relabel, drop or keep) applied to the data before "
                          "training; default: the one the review queue wrote for DATA, if any; none: ignore it."),
    "folds": Option("K-fold cross-validation: K runs, mean ± spread."),
    "seeds": Option("Train N models (seeds seed..seed+N-1) and ensemble them."),
    "human_error": Option("Human-level error (e.g. 0.05) for the bias/variance diagnosis."),
    "tta": Option("Average predictions with the mirrored image.", ("--tta/--no-tta",)),
    "unknown_keep": Option("Images of none of the classes answer 'unknown': the threshold keeps this share of the "
                           "validation images (0: no unknown answer)."),
    "unknown_score": Option("The unknown-image score (default: the one bench/unknown.py picked; see "
                            "docs/unknown.md)."),
    "dropout": Option("Dropout before the classifier."),
    "device": Option("auto | cpu | cuda"),
    "amp": Option("bf16 mixed precision (default: where native).", ("--amp/--no-amp",)),
    "compile": Option("torch.compile the model (GPU, long runs).", ("--compile",)),
    "patience": Option("Stop after this many epochs without improvement."),
    "monitor": Option("val_acc | val_loss: keep the best epoch's weights; last: the final ones."),
    "val_fraction": Option("Validation share when DATA has no val split."),
    "seed": Option("Seed: same seed, same run (on CPU)."),
    "out": Option("Run folder (default runs/DATA-MODEL-TIME)."),
    "resume": Option("Continue the run in --out from its last checkpoint.", ("--resume",)),
    "cache": Option("Where the decoded images live: auto (in memory if they fit in half the free memory, else "
                    "disk), memory, disk (read from $FOVEA_HOME/cache in batches: memory stays flat), none (in "
                    "memory, no cache entry kept).", metavar="auto|memory|disk|none"),
}


def preprocess_steps(cfg: TrainConfig) -> list[Any]:
    """The --preprocess steps (fovea.ops.Step); OpenCV is imported only when there are some."""
    if not cfg.preprocess or cfg.preprocess == "none":
        return []
    from fovea.ops import parse_steps

    return parse_steps(cfg.preprocess)


def _model_optimizer(model: str | None) -> str | None:
    """The optimizer a Fovea model names in its config (the recurrent ones: adamw), else None."""
    if not model:
        return None
    from fovea.models import default_config

    try:
        return default_config(model).get("optimizer")
    except FoveaError:
        return None


GPU_CNN_WIDTHS = (48, 96, 192, 384, 512)
DEFAULT_CPU_TIME = 300.0  # seconds: the whole `fovea train DATA` on a CPU, when neither --time nor --epochs is given


def resolve(cfg: TrainConfig, *, device_type: str, n_train: int, source: str, native_size: int,
            cpu_bf16: bool) -> tuple[TrainConfig, dict[str, str]]:
    """Fill every None with a default for this model, data size and hardware; say why for each."""
    why: dict[str, str] = {}
    c = dataclasses.replace(cfg)
    gpu = device_type == "cuda"
    small_own = source == "fovea"
    # On a GPU the cnn can afford to be wide and see more pixels: this recipe (160 px, widths 48-512,
    # ~400k image passes) reached 92.8 % on pets from scratch in 62 s on an H200 (docs/benchmarks.md).
    gpu_cnn = gpu and c.model == "cnn" and c.weights is None
    if gpu_cnn and "widths" not in c.extra:
        c.extra = {**c.extra, "widths": GPU_CNN_WIDTHS}
        why["widths"] = f"{','.join(map(str, GPU_CNN_WIDTHS))}: a wider cnn on a GPU"
    if c.image_size is None:
        if gpu_cnn:
            c.image_size = 160
        elif small_own:
            c.image_size = native_size if not gpu else max(native_size, 96)
        else:
            c.image_size = native_size if gpu else min(native_size, 160)
        why["image_size"] = f"{c.image_size} px: {'model default' if c.image_size == native_size else 'smaller on CPU for speed' if not gpu else 'more detail on GPU'}"
    if c.batch_size is None:
        c.batch_size = 64 if n_train < 1000 else (256 if gpu else 128)
        # Small data sets (64 per batch): at least ~8 steps per epoch (a power of two, >= 8), or a few epochs
        # are a few steps. Larger sets keep the batch their recipe was measured with.
        while c.batch_size <= 64 and c.batch_size > 8 and n_train < 8 * c.batch_size:
            c.batch_size //= 2
        why["batch_size"] = f"{c.batch_size} for {n_train} training images on {device_type}"
    if c.pretrained is None:  # --mode scratch: random initialisation, never a download
        c.pretrained = source == "timm" and c.weights is None and c.mode != "scratch"
        if c.pretrained:
            why["pretrained"] = "timm hub weights (the default for timm architectures; --no-pretrained to train from scratch)"
    transfer = bool(c.weights or c.pretrained)
    if c.mode is None:
        c.mode = "auto" if transfer else "scratch"
    if c.mode != "scratch" and not transfer:
        raise FoveaError(f"--mode {c.mode} starts from trained weights: add --weights FILE|RUN, or --pretrained "
                         "for a timm architecture (hub weights need the network)")
    own_optimizer = _model_optimizer(c.model) if small_own else None
    if c.optimizer is None and own_optimizer:
        c.optimizer = own_optimizer
        why["optimizer"] = f"{own_optimizer}: the one {c.model} was tuned with"
    if c.optimizer is None:
        c.optimizer = "sgd" if small_own and not transfer else "adamw"
        why["optimizer"] = ("SGD + Nesterov trains small nets from scratch best" if c.optimizer == "sgd"
                            else "AdamW for transfer learning" if transfer else "AdamW for deep nets")
    if c.lr is None:
        base = {"sgd": 0.2, "rmsprop": 1e-3, "adam": 2e-3, "adamw": 2e-3}[c.optimizer]
        c.lr = base * c.batch_size / 256 if c.optimizer == "sgd" else base
        if transfer:
            c.lr /= 2  # the course: keep learning rates small on trained weights
        why["lr"] = f"{c.lr:g} (peak, {c.schedule})"
    if c.weight_decay is None:
        c.weight_decay = {"sgd": 5e-4, "rmsprop": 1e-5, "adam": 0.0, "adamw": 0.05}[c.optimizer]
    if c.augment is None:
        c.augment = "standard"
    strong = c.augment == "strong"
    if c.mixup is None:
        c.mixup = 0.8 if strong else 0.0  # timm's defaults
    if c.cutmix is None:
        c.cutmix = 1.0 if strong else 0.0
    if (c.mixup or c.cutmix) and c.batch_size % 2:
        raise FoveaError(f"mixup/cutmix pair each image with another in the batch: use an even --batch-size, not {c.batch_size}")
    if c.time is None and c.epochs is None and not gpu:
        c.time = DEFAULT_CPU_TIME
        why["time"] = (f"{c.time / 60:g} min for the whole run on a CPU (--time to change it, --epochs for a fixed "
                       "number): the epochs are fitted to this machine's measured speed")
    if c.epochs is None:
        # Budget in image-passes: small data needs many epochs; a CPU can afford ~60k passes of the cnn
        # at 64 px in ~4 minutes (docs/benchmarks.md).
        if transfer:  # trained weights need far fewer passes; a frozen backbone's head trains in seconds
            c.epochs = max(10, min(30, 30_000 // max(n_train, 1)))
        elif gpu_cnn:
            c.epochs = max(20, min(200, 400_000 // max(n_train, 1)))
        elif gpu:
            c.epochs = 40 if small_own else 30
        else:
            c.epochs = max(10, min(80, 120_000 // max(n_train, 1))) if small_own else max(3, min(15, 20_000 // max(n_train, 1)))
        why["epochs"] = f"{c.epochs} for {n_train} images on {device_type}" + (" (at most: the time budget may "
                                                                              "set fewer)" if c.time else "")
    if c.amp is None:
        c.amp = gpu or cpu_bf16
        why["amp"] = "bf16 autocast" if c.amp else "fp32 (no native bf16 on this CPU)"
    if c.channels_last is None:
        c.channels_last = gpu or bool(c.amp)  # oneDNN bf16 convs want NHWC: 2x measured on Zen 4
    return c, why
