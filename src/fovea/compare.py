"""``fovea compare``: train several architectures on the same data and put them in one table.

The course's fully connected vs convolutional comparison, for any models: per model its parameters, forward
FLOPs per image, training time, validation accuracy, balanced accuracy and ROC-AUC, each read back from the
run folder that ``fovea.train`` wrote (``OUT/<model>/``), so the table shows what the artifacts hold.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fovea._system import machine
from fovea.errors import FoveaError

log = logging.getLogger("fovea.compare")

# What a comparison may set for every model. The rest of TrainConfig either names one run (data, model, out,
# resume) or starts from one model's weights (weights, mode, freeze), which cannot hold across architectures.
TRAIN_OPTIONS = ("epochs", "image_size", "batch_size", "device", "seed", "pretrained", "val_fraction", "cache",
                 "augment", "lr", "optimizer", "weight_decay", "schedule", "label_smoothing", "tta", "dropout",
                 "amp", "channels_last", "compile", "patience", "monitor", "preprocess", "clip_grad", "time")

# (header, row key, format): one table for the terminal (rich) and compare.md. Three decimals of accuracy:
# a 1000-image val set resolves 0.1 %, and its 95 % interval is some ±2 % wide anyway.
COLUMNS: list[tuple[str, str, str]] = [
    ("model", "model", "{}"),
    ("parameters", "parameters", "{:,}"),
    ("MFLOPs/image", "mflops_per_image", "{:,.1f}"),
    ("px", "image_size", "{}"),
    ("epochs", "epochs", "{}"),
    ("pretrained", "pretrained", "{}"),
    ("train s", "train_seconds", "{:.1f}"),
    ("wall s", "wall_seconds", "{:.1f}"),
    ("val acc", "accuracy", "{:.3f}"),
    ("balanced acc", "balanced_accuracy", "{:.3f}"),
    ("ROC-AUC", "roc_auc", "{:.3f}"),
]

NOTES = (
    "MFLOPs/image: FLOPs of one image's forward pass at the model's input size (px), counted by "
    "torch.utils.flop_counter: 2 FLOPs per multiply-add of the convolutions and matrix products; norms, "
    "activations and pooling are not counted. train s: the training loop (metrics.json train_seconds); "
    "wall s: the model's whole fovea.train call (decoding, training, final evaluation, report). "
    "Accuracies and ROC-AUC (binary, or macro one-vs-rest): the validation split, as each run's metrics.json "
    "holds them (best epoch restored, mirror TTA by default). Classical models (hog-svm, ...): parameters are "
    "the fitted arrays (standardisation, classifier; k-NN's stored training features), and MFLOPs add an "
    "estimate of the handcrafted features' arithmetic, which runs outside torch; train s is their feature "
    "extraction and fit (no epochs). compare.png: accuracy against training time."
)


def count_flops(net: Any, image_size: int) -> int:
    """FLOPs of one forward pass of ``net`` on one (1, 3, S, S) image, in eval mode (``fovea summary``'s total)."""
    from fovea.models import summarize

    return summarize(net, image_size=image_size).flops


def compare(
    data: str | Path,
    models: Sequence[str],
    *,
    out: str | Path | None = None,
    progress: bool = True,
    **train_kwargs: Any,
) -> list[dict[str, Any]]:
    """Train each model on ``data`` into ``OUT/<model>/`` and write OUT/compare.{csv,json,md}.

    Args:
        data: what ``fovea.train`` takes: a folder (DATA/CLASS/*, DATA/train|val/CLASS/*) or a CSV.
        models: architecture names (``fovea models``); every name is checked before any training starts.
        out: folder for the runs and the table; default ``runs/compare-<data>-<timestamp>``.
        progress: progress bars while training.
        **train_kwargs: options passed to every ``fovea.train`` call (see ``TRAIN_OPTIONS``). ``pretrained``
            applies to timm and torchvision models only: Fovea's own models have no hub weights.

    Returns:
        One row per model, in the order given. A model whose training failed with a FoveaError (e.g. timm
        weights that cannot be downloaded offline) has its message in ``error`` and no metrics; the others
        go on. The files are rewritten after each model, so an interrupted comparison keeps what finished.
    """
    from fovea.data import discover
    from fovea.models import source_of
    from fovea.runtime import pick_device
    from fovea.training import TrainConfig, train

    start = time.perf_counter()
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip()]
    if not names:
        raise FoveaError("no models to compare; give e.g. --models mlp,cnn")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise FoveaError(f"model(s) listed twice: {', '.join(twice)}; each model gets one run folder")
    unknown = sorted(set(train_kwargs) - set(TRAIN_OPTIONS))
    if unknown:
        raise FoveaError(f"compare cannot pass {', '.join(unknown)} to training; it takes: {', '.join(TRAIN_OPTIONS)}")
    # Everything that can be checked is checked now, not after the first model has trained for minutes.
    sources = {m: source_of(m) for m in names}  # FoveaError with "did you mean" for a misspelt name
    per_model = {m: _kwargs_for(sources[m], train_kwargs) for m in names}
    configs = [TrainConfig(data=str(data), model=m, **per_model[m]) for m in names]
    for cfg in configs:
        cfg.validate()
    discover(data, configs[0].val_fraction, configs[0].seed)  # the data's own errors, once, before training
    pick_device(configs[0].device)  # --device cuda without a GPU
    root = Path(out) if out is not None else default_out(data)
    if (root / "model.json").exists():
        raise FoveaError(f"{root} is a model's run folder; give compare a folder of its own with --out")
    taken = [str(root / m) for m in names if (root / m).exists() and any((root / m).iterdir())]
    if taken:
        raise FoveaError(f"run folder(s) already exist and are not empty: {', '.join(taken)}; choose another --out")
    ignored = train_kwargs.get("pretrained") and [m for m in names if sources[m] == "fovea"]
    if ignored:
        log.info("--pretrained does not apply to %s (Fovea's own models have no hub weights)", ", ".join(ignored))

    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, m in enumerate(names, 1):
        log.info("compare: training %s (%d of %d) into %s", m, i, len(names), root / m)
        clock = time.perf_counter()
        try:
            run = train(data, model=m, out=str(root / m), progress=progress, **per_model[m])
        except FoveaError as e:
            log.warning("compare: %s failed, going on with the others: %s", m, e)
            rows.append({"model": m, "source": sources[m], "error": str(e),
                         "wall_seconds": round(time.perf_counter() - clock, 2)})
        else:
            rows.append(_row(m, sources[m], run, wall=time.perf_counter() - clock))
        _write(root, rows, data=data, train_kwargs=train_kwargs, wall=time.perf_counter() - start)
    failed = [r["model"] for r in rows if r.get("error")]
    if failed:
        log.warning("compare: %d of %d model(s) failed: %s (the error is in each one's row)",
                    len(failed), len(rows), ", ".join(failed))
    return rows


def _kwargs_for(source: str, train_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The training options for one model: ``pretrained`` means nothing to Fovea's own models."""
    if source == "fovea":
        return {k: v for k, v in train_kwargs.items() if k != "pretrained"}
    return dict(train_kwargs)


def default_out(data: str | Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"compare-{Path(data).expanduser().resolve().stem or 'data'}-{stamp}"


def _row(model: str, source: str, run: Path, wall: float) -> dict[str, Any]:
    """One table row, read back from the run folder (metrics.json, model.json) and the loaded model."""
    from fovea.runtime import TorchModel, load

    metrics = json.loads((run / "metrics.json").read_text())
    loaded = load(run, device="cpu")
    assert isinstance(loaded, TorchModel), "fovea.train writes one model, not an ensemble"
    flops = count_flops(loaded.net, loaded.image_size)
    return {
        "model": model,
        "source": source,
        "parameters": sum(p.numel() for p in loaded.net.parameters()),
        "flops_per_image": flops,
        "mflops_per_image": flops / 1e6,
        "image_size": loaded.image_size,
        "epochs": metrics["epochs_run"],
        "pretrained": bool(loaded.meta["training"].get("pretrained")),
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": round(wall, 2),
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "roc_auc": metrics["roc_auc"],
        "n_train": metrics["n_train"],
        "n_val": metrics["n_val"],
        "run": str(run),
        "error": None,
    }


def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the comparison table; a failed model reads "failed" and then "-"."""
    cells = []
    for r in rows:
        line = []
        for _, key, fmt in COLUMNS:
            v = r.get(key)
            if isinstance(v, bool):
                v = "yes" if v else "no"
            line.append("n/a" if v is None else fmt.format(v))  # ROC-AUC is None when a class is missing
        cells.append([r["model"], "failed"] + ["-"] * (len(COLUMNS) - 2) if r.get("error") else line)
    return [h for h, _, _ in COLUMNS], cells


def to_markdown(rows: list[dict[str, Any]], *, data: str | Path, wall: float) -> str:
    headers, cells = table(rows)
    lines = [f"# fovea compare: {data}", "", "| " + " | ".join(headers) + " |",
             "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    lines += ["", f"Whole comparison: {wall:.1f} s on {machine()}.", "", NOTES]
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "Failed:", ""] + [f"- `{r['model']}`: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def _write(root: Path, rows: list[dict[str, Any]], *, data: str | Path, train_kwargs: dict[str, Any],
           wall: float) -> None:
    keys = list(dict.fromkeys(k for r in rows if not r.get("error") for k in r)) or ["model", "source"]
    keys += [k for k in ("error", "wall_seconds") if k not in keys]
    with open(root / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in keys})
    summary = {"data": str(data), "out": str(root), "machine": machine(), "wall_seconds": round(wall, 2),
               "train_options": train_kwargs, "notes": NOTES, "rows": rows}
    (root / "compare.json").write_text(json.dumps(summary, indent=2, default=str))
    (root / "compare.md").write_text(to_markdown(rows, data=data, wall=wall))
    plot(rows, root / "compare.png", title=f"fovea compare: {Path(data).name}")


def plot(rows: list[dict[str, Any]], path: Path, *, title: str) -> Path | None:
    """Validation accuracy against training seconds (log scale), one labelled point per model that trained."""
    done = [r for r in rows if not r.get("error")]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in done:
        seconds = max(float(r["train_seconds"]), 1e-2)
        ax.scatter(seconds, r["accuracy"], s=30)
        ax.annotate(r["model"], (seconds, r["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.set(xscale="log", xlabel="training seconds (log scale)", ylabel="validation accuracy", title=title)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
