"""The ``fovea`` command: a thin layer that parses options and calls the Python API."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fovea.errors import FoveaError

app = typer.Typer(
    name="fovea",
    help="Fovea: from a folder of labelled images to a classifier trained well and evaluated honestly.\n\n"
    "Start with `fovea demo`, or `fovea check DATA` then `fovea train DATA`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
log = logging.getLogger("fovea")


def _setup_logging(quiet: bool = False) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if quiet else logging.INFO
    from rich.console import Console

    # on stderr: stdout carries the results (--json output must stay parseable)
    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False, markup=False,
                          rich_tracebacks=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("fovea").setLevel(level)


def _examples(*lines: str) -> str:
    return "**Examples**\n\n" + "\n\n".join(f"`{line}`" for line in lines)


def _parse_arch(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise FoveaError(f"--arch expects KEY=VALUE (e.g. widths=32,64,128,256), got {item!r}")
        key, value = item.split("=", 1)
        parts = [p.strip() for p in value.split(",")]
        vals: list[Any] = []
        for p in parts:
            try:
                vals.append(json.loads(p))
            except ValueError:
                vals.append(p)
        out[key.strip().replace("-", "_")] = vals if len(vals) > 1 else vals[0]
    return out


@app.command(epilog=_examples("fovea demo", "fovea demo --out runs/demo --epochs 5"))
def demo(
    out: Annotated[Path, typer.Option(help="Run folder to write.")] = Path("runs/demo"),
    data: Annotated[Path | None, typer.Option(help="Data to use instead of the one found or made.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override the number of epochs.")] = None,
) -> None:
    """Find or make a small real data set, train on it, evaluate, predict a few images, show the report."""
    from fovea.demo import run_demo

    run_demo(out=out, data=data, epochs=epochs)


@app.command(epilog=_examples("fovea check data/pets", "fovea check data/pets --json > check.json",
                              "fovea check labels.csv --val-fraction 0.25",
                              "fovea check scans/ --group-regex '^(patient\\d+)_'   # one patient, one split"))
def check(
    data: Annotated[Path, typer.Argument(help="A folder (DATA/CLASS/*, DATA/train|val/CLASS/*) or a CSV path,label[,group].")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    val_fraction: Annotated[float, typer.Option(help="Validation share when DATA has no val split.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of that split.")] = 0,
    near_threshold: Annotated[int, typer.Option(min=0, max=64, help="Max Hamming distance of 64-bit perceptual hashes for a near-duplicate.")] = 4,
    group_regex: Annotated[str | None, typer.Option(help="Group (patient, source) = this regex's first group on the file name; flags groups in two splits.")] = None,
) -> None:
    """Look at a data set: counts, imbalance, sizes and modes, unreadable files, duplicates and leakage."""
    from fovea.data._check import check as run_check
    from fovea.data._check import print_report

    report = run_check(data, val_fraction=val_fraction, seed=seed, near_threshold=near_threshold,
                       progress=not as_json, group_regex=group_regex)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_report(report)


@app.command(epilog=_examples("fovea models", "fovea models --source fovea", "fovea models --filter resnet"))
def models(
    source: Annotated[str, typer.Option(help="all | fovea | torchvision | timm")] = "all",
    filter: Annotated[str | None, typer.Option("--filter", help="Only names containing this text.")] = None,
) -> None:
    """List every architecture Fovea can train."""
    from fovea.models import list_models

    if source not in ("all", "fovea", "torchvision", "timm"):
        raise FoveaError(f"--source must be all, fovea, torchvision or timm, not {source!r}")
    names = [n for n in list_models(source) if not filter or filter in n]
    for n in names:
        typer.echo(n)
    typer.echo(f"{len(names)} models", err=True)


@app.command(epilog=_examples(
    "fovea train data/pets",
    "fovea train data/pets --model resnet18 --image-size 224 --epochs 30 --device cuda",
    "fovea train data/pets --model cnn --image-size 160 --epochs 200 --arch widths=48,96,192,384,512",
    "fovea train data/pets --out runs/pets --resume --epochs 60",
    "fovea train data/pets-extra --model resnet18 --no-pretrained --out runs/backbone   # pretrain a backbone",
    "fovea train data/hymenoptera --weights runs/backbone --mode auto",
    "fovea train data/hymenoptera --weights resnet18.safetensors --model resnet18 --mode finetune --freeze 0.5",
    "fovea train data/pets --augment strong --dropout 0.3 --l1 1e-6 --human-error 0.02",
    "fovea train scans.csv --class-weights auto --folds 5          # imbalanced, grouped, cross-validated",
    "fovea train scans/ --sampler balanced --group-regex '^(patient\\d+)_'",
    "fovea train data/pets --seeds 5 --out runs/pets-ens           # 5 models and their ensemble",
    "fovea train data/xrays --preprocess gray,clahe                # classical steps, kept in the model",
))
def train(
    data: Annotated[Path | None, typer.Argument(help="A folder (DATA/CLASS/*, DATA/train|val/CLASS/*) or a CSV path,label[,group]. With --from-store: the original data, if it moved.")] = None,
    from_store: Annotated[str | None, typer.Option(help="Retrain registered model NAME on its original data plus the images confirmed in its review queue, with its production version's settings; registers the result as NAME:candidate.")] = None,
    model: Annotated[str | None, typer.Option(help="Architecture: mlp, cnn, any timm name, alexnet, googlenet (`fovea models`); default cnn, or the --weights run's.")] = None,
    weights: Annotated[str | None, typer.Option(help="Start from these weights: a .safetensors/.pth/.pt file or a Fovea run folder.")] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained", help="timm hub weights (default for timm architectures; needs the network).")] = None,
    mode: Annotated[str | None, typer.Option(help="scratch | features | finetune | auto (default: auto with weights, else scratch).")] = None,
    freeze: Annotated[float | None, typer.Option(help="finetune: share of the backbone frozen from the input side (0-1).")] = None,
    head_epochs: Annotated[int | None, typer.Option(help="finetune: epochs training only the new head first (default 1-3).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Square input size in px (default: per model and device).")] = None,
    preprocess: Annotated[str | None, typer.Option(help="Classical operations applied to every image after the resize, e.g. gray,clahe or gray,clahe:clip=3 (`fovea ops list`); recorded in the model, so predict and serve apply them too. A --weights run's steps are kept unless you give others or `none`.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: from data size and device).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd | adam | adamw | rmsprop")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="L2 weight decay.")] = None,
    schedule: Annotated[str, typer.Option(help="onecycle | cosine | constant")] = "onecycle",
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.")] = 0.1,
    augment: Annotated[str | None, typer.Option(help="none | flip | light (translate+flip) | standard (random resized crop+flip) | strong (+rotation, colour jitter, random erasing, mixup/cutmix)")] = None,
    mixup: Annotated[float | None, typer.Option(help="Mixup alpha (0 off; default 0.8 with --augment strong).")] = None,
    cutmix: Annotated[float | None, typer.Option(help="CutMix alpha (0 off; default 1.0 with --augment strong).")] = None,
    l1: Annotated[float, typer.Option(help="L1 penalty on weights, added to the loss.")] = 0.0,
    batch_norm: Annotated[bool | None, typer.Option("--batch-norm/--no-batch-norm", help="mlp/cnn: with or without batch norm (default with).")] = None,
    class_weights: Annotated[str, typer.Option(help="none | auto (loss weighted against imbalance)")] = "none",
    sampler: Annotated[str, typer.Option(help="shuffle | balanced (oversample rare classes)")] = "shuffle",
    group_regex: Annotated[str | None, typer.Option(help="Group (patient, source) = this regex's first group on the file name; splits keep groups whole.")] = None,
    folds: Annotated[int | None, typer.Option(help="K-fold cross-validation: K runs, mean ± spread.")] = None,
    seeds: Annotated[int, typer.Option(help="Train N models (seeds seed..seed+N-1) and ensemble them.")] = 1,
    human_error: Annotated[float | None, typer.Option(help="Human-level error (e.g. 0.05) for the bias/variance diagnosis.")] = None,
    tta: Annotated[bool, typer.Option(help="Average predictions with the mirrored image.")] = True,
    dropout: Annotated[float | None, typer.Option(help="Dropout before the classifier.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="bf16 mixed precision (default: where native).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (GPU, long runs).")] = False,
    patience: Annotated[int | None, typer.Option(help="Stop after this many epochs without improvement.")] = None,
    monitor: Annotated[str, typer.Option(help="val_acc | val_loss: keep the best epoch's weights; last: the final ones.")] = "val_acc",
    val_fraction: Annotated[float, typer.Option(help="Validation share when DATA has no val split.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same run (on CPU).")] = 0,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/DATA-MODEL-TIME).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    cache: Annotated[bool, typer.Option(help="Reuse decoded images from $FOVEA_HOME/cache.")] = True,
    arch: Annotated[list[str] | None, typer.Option(help="Architecture option KEY=VALUE, repeatable.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train a model; writes a run folder with the model, metrics, history.csv and report.html."""
    from fovea.training import train as run_train

    _setup_logging(quiet)
    if from_store:
        from fovea.review import retrain

        given: dict[str, Any] = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed if seed != 0 else None,
                 "device": device if device != "auto" else None}
        v, gained = retrain(from_store, data=data, progress=not quiet, **{k: x for k, x in given.items() if x is not None})
        _print_train_result(Path(v.path) if (Path(v.path) / "metrics.json").exists() else Path(v.source))
        typer.echo(f"labelled images added: {', '.join(f'{c} {n}' for c, n in sorted(gained.items()))}")
        typer.echo(f"registered {v.ref} ({', '.join(v.aliases)}); roll it out: fovea deploy {v.ref} --strategy canary")
        return
    if data is None:
        raise FoveaError("give the data folder (or CSV), or --from-store NAME")
    extra = _parse_arch(arch)
    if batch_norm is not None:
        extra["batch_norm"] = batch_norm
    run = run_train(
        data, model=model, weights=weights, pretrained=pretrained, mode=mode, freeze=freeze, head_epochs=head_epochs,
        image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
        weight_decay=weight_decay, schedule=schedule, label_smoothing=label_smoothing, augment=augment, tta=tta,
        dropout=dropout, device=device, amp=amp, compile=compile, patience=patience, monitor=monitor,
        val_fraction=val_fraction, seed=seed, out=str(out) if out else None, resume=resume, cache=cache,
        extra=extra, progress=not quiet, mixup=mixup, cutmix=cutmix, l1=l1, class_weights=class_weights,
        sampler=sampler, group_regex=group_regex, folds=folds, seeds=seeds, human_error=human_error,
        preprocess=preprocess or (),
    )
    _print_train_result(run)


def _print_train_result(run: Path) -> None:
    from fovea.evaluation import format_diagnosis

    if (run / "cv.json").exists():
        cv = json.loads((run / "cv.json").read_text())
        typer.echo((run / "cv.md").read_text().rstrip())
        typer.echo(f"{cv['k']}-fold cross-validation: accuracy {cv['summary']['accuracy']['mean']:.4f} ± "
                   f"{cv['summary']['accuracy']['std']:.4f} (sample std over folds)\nruns: {run}/fold-*")
        return
    m = json.loads((run / "metrics.json").read_text())
    auc = f"{m['roc_auc']:.4f}" if m.get("roc_auc") is not None else "n/a"
    if "members" in m:
        for r in m["members"]:
            typer.echo(f"member {Path(r['run']).name}: val accuracy {r['accuracy']:.4f}")
        typer.echo(f"ensemble of {len(m['members'])}: val accuracy {m['accuracy']:.4f}  balanced "
                   f"{m['balanced_accuracy']:.4f}  ROC-AUC {auc}  ({m['n_val']} images)")
        typer.echo(f"ensemble model: {run}  (fovea predict {run} IMAGE)")
        return
    meta = json.loads((run / "model.json").read_text())
    auto = meta.get("transfer", {}).get("auto")
    if auto:
        typer.echo(f"--mode auto chose {meta['transfer']['mode']}: {auto['why']}")
    typer.echo(f"val accuracy {m['accuracy']:.4f}  balanced {m['balanced_accuracy']:.4f}  ROC-AUC {auc}  "
               f"({m['n_val']} images, {m['skipped']} skipped)")
    if m.get("diagnosis"):
        typer.echo(format_diagnosis(m["diagnosis"]))
    typer.echo(f"run folder: {run}\nreport:     {run / 'report.html'}")


@app.command(epilog=_examples("fovea evaluate runs/pets data/pets", "fovea evaluate runs/pets data/pets/val --json",
                              "fovea evaluate runs/scans data/scans --human-error 0.05   # bias or variance?"))
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder (model.safetensors + model.json).")],
    data: Annotated[Path, typer.Argument(help="Class folders (all evaluated) or a split layout (its test, else val, split).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    report: Annotated[Path | None, typer.Option(help="Also write an HTML report here.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    human_error: Annotated[float | None, typer.Option(help="Human-level error (e.g. 0.05) for the bias/variance diagnosis.")] = None,
) -> None:
    """Accuracy, balanced accuracy, precision/recall/F1, ROC-AUC and the confusion matrix on held-out data."""
    from fovea.evaluation import evaluate as run_eval
    from fovea.evaluation import format_diagnosis

    _setup_logging(quiet=as_json)
    if human_error is not None and not 0 <= human_error < 1:
        raise FoveaError(f"--human-error is an error rate in [0, 1), got {human_error}")
    m = run_eval(run, data, device=device, report=report, progress=not as_json, human_error=human_error)
    m.pop("roc_curves", None)
    if as_json:
        typer.echo(json.dumps(m, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    auc = f"{m['roc_auc']:.4f}" if m["roc_auc"] is not None else "n/a (a class is missing)"
    con.print(f"[bold]{m['n_images']}[/] images ({m['split']} split), {m['skipped']} skipped")
    con.print(f"accuracy {m['accuracy']:.4f}   balanced accuracy {m['balanced_accuracy']:.4f}   "
              f"macro F1 {m['f1_macro']:.4f}   ROC-AUC {auc}")
    t = Table("class", "precision", "recall", "F1", "support")
    for c, v in m["per_class"].items():
        t.add_row(c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(v["support"]))
    con.print(t)
    cm = Table("true \\ predicted", *m["classes"])
    for c, row in zip(m["classes"], m["confusion_matrix"]):
        cm.add_row(c, *map(str, row))
    con.print(cm)
    for q in m["quarantined"]:
        con.print(f"[yellow]skipped[/] {q['path']}: {q['reason']}")
    if m.get("diagnosis"):
        con.print(format_diagnosis(m["diagnosis"]), markup=False)


@app.command(epilog=_examples("fovea predict runs/pets cat.jpg dog.png", "fovea predict runs/pets photos/ --json --top-k 2"))
def predict(
    run: Annotated[Path, typer.Argument(help="A run folder (model.safetensors + model.json).")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    top_k: Annotated[int, typer.Option(min=1, help="Show the k most likely classes.")] = 1,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Label images: the class, its probability and every class's probability."""
    from fovea.artifact import load

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.exists():
            files.append(p)
        else:
            raise FoveaError(f"{p} does not exist")
    if not files:
        raise FoveaError("no files to predict")
    model = load(run, device)
    skipped: list[tuple[str, str]] = []
    for i in range(0, len(files), 256):
        preds, bad = model.predict(files[i : i + 256])
        skipped += bad
        for pr in preds:
            top = sorted(pr.probabilities.items(), key=lambda kv: -kv[1])[:top_k]
            if as_json:
                typer.echo(json.dumps({**pr.to_dict(), "top_k": [{"label": k, "probability": v} for k, v in top]}))
            else:
                typer.echo(f"{pr.path}\t" + "  ".join(f"{k} {v:.3f}" for k, v in top))
    for path, reason in skipped:
        if as_json:
            typer.echo(json.dumps({"path": path, "error": reason}))
        else:
            typer.echo(f"{path}\tskipped: {reason}", err=True)
    if skipped and len(skipped) == len(files):
        raise typer.Exit(1)


@app.command(epilog=_examples(
    "fovea compare data/pets",
    "fovea compare data/pets --models mlp,cnn,resnet18 --no-pretrained --epochs 20 --out runs/fc-vs-cnn",
    "fovea compare data/pets --models cnn,resnet18,mobilenetv3_small_100 --image-size 128 --device cuda",
))
def compare(
    data: Annotated[Path, typer.Argument(help="A folder (DATA/CLASS/*, DATA/train|val/CLASS/*) or a CSV path,label[,group].")],
    models: Annotated[str, typer.Option(help="Comma-separated architectures (`fovea models`), each trained on DATA.")] = "mlp,cnn",
    epochs: Annotated[int | None, typer.Option(help="Epochs for every model (default: per model, data size and device).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Square input size in px for every model (default: per model and device).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of every run.")] = 0,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained", help="timm hub weights (default for timm architectures; needs the network).")] = None,
    preprocess: Annotated[str | None, typer.Option(help="Classical steps after the resize for every model, as `fovea train --preprocess` (e.g. gray,clahe).")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the runs (OUT/MODEL) and the table (default runs/compare-DATA-TIME).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train several models on the same data; one table of parameters, FLOPs, time and validation metrics."""
    import time

    from rich.console import Console
    from rich.markup import escape

    from fovea.compare import compare as run_compare
    from fovea.compare import default_out, rich_table

    _setup_logging(quiet)
    start = time.perf_counter()
    root = out or default_out(data)
    rows = run_compare(data, models.split(","), out=root, progress=not quiet, epochs=epochs, image_size=image_size,
                       batch_size=batch_size, device=device, seed=seed, pretrained=pretrained,
                       **({"preprocess": preprocess} if preprocess else {}))
    con = Console()
    t = rich_table(rows, title=f"fovea compare: {escape(str(data))}", width=con.width)
    con.print(t)
    for r in rows:
        if r.get("error"):
            con.print(f"[red]{escape(r['model'])} failed:[/] {escape(r['error'])}", highlight=False)
    con.print(f"whole command: {time.perf_counter() - start:.1f} s\n"
              f"table: {root / 'compare.md'} (also compare.csv, compare.json)\n"
              f"runs:  {root}/MODEL", highlight=False)
    if all(r.get("error") for r in rows):
        raise typer.Exit(1)


@app.command(epilog=_examples(
    "fovea ensemble runs/pets-s0 runs/pets-s1 runs/pets-s2 --out runs/pets-ens",
    "fovea ensemble runs/pets-cnn64 runs/pets-resnet18 --out runs/pets-ens --data data/pets   # table: members vs ensemble",
    "fovea predict runs/pets-ens cat.jpg   # an ensemble is used like any model",
))
def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="Two or more run folders with the same classes (any architectures and sizes).")],
    out: Annotated[Path, typer.Option(help="Folder to write the ensemble model into (members are copied there).")],
    data: Annotated[Path | None, typer.Option(help="Evaluate the ensemble and each member on DATA (its test, else val, split).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Combine trained models into one model that averages their class probabilities."""
    from fovea.ensemble import make_ensemble, metrics_table

    _setup_logging(quiet)
    path = make_ensemble(runs, out, data=data, progress=not quiet)
    metrics = json.loads((path / "model.json").read_text()).get("metrics")
    if metrics:
        from rich.console import Console

        Console().print(metrics_table(metrics))
    typer.echo(f"ensemble of {len(runs)} models: {path}  (fovea predict {path} IMAGE)")


@app.command("lr-find", epilog=_examples(
    "fovea lr-find data/pets",
    "fovea lr-find data/pets --model mlp --image-size 32 --out runs/lrf-mlp",
    "fovea lr-find data/hymenoptera --weights runs/backbone --batch-size 32   # the fine-tuning LR",
    "fovea lr-find data/pets --optimizer adamw --steps 200 --end-lr 1",
))
def lr_find(
    data: Annotated[Path, typer.Argument(help="A folder (DATA/CLASS/*, DATA/train|val/CLASS/*) or a CSV path,label[,group].")],
    model: Annotated[str | None, typer.Option(help="Architecture (`fovea models`); default cnn, or the --weights run's.")] = None,
    weights: Annotated[str | None, typer.Option(help="Start from these weights: a .safetensors/.pth/.pt file or a Fovea run folder.")] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained", help="timm hub weights (default for timm architectures; needs the network).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd | adam | adamw | rmsprop (default: what `fovea train` picks).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: what `fovea train` picks).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Square input size in px (default: per model and device).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    start_lr: Annotated[float, typer.Option(help="First learning rate of the sweep.")] = 1e-7,
    end_lr: Annotated[float, typer.Option(help="Last learning rate of the sweep.")] = 10.0,
    steps: Annotated[int, typer.Option(help="Mini-batches in the sweep, one LR each (the data is cycled).")] = 100,
    val_fraction: Annotated[float, typer.Option(help="Validation share when DATA has no val split (held out, as in train).")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed: initial weights, batch order, augmentation.")] = 0,
    preprocess: Annotated[str | None, typer.Option(help="Classical steps after the resize, as `fovea train --preprocess` (e.g. gray,clahe); default: none, or the --weights run's.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for lr_find.png and lr_find.csv (default runs/lr-find-DATA-TIME).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """The learning-rate range test: ~100 steps with a growing LR; plots the loss and suggests --lr for train."""
    from fovea.training import lr_find as run_lr_find

    _setup_logging(quiet)
    r = run_lr_find(data, out=out, start_lr=start_lr, end_lr=end_lr, steps=steps, model=model, weights=weights,
                    pretrained=pretrained, optimizer=optimizer, batch_size=batch_size, image_size=image_size,
                    device=device, val_fraction=val_fraction, seed=seed, preprocess=preprocess or (),
                    progress=not quiet)
    stop = (f"stopped at LR {r.diverged_lr:.3g}, where the smoothed loss passed 4x its minimum"
            if r.diverged_lr is not None else f"no blow-up up to LR {r.lrs[-1]:.3g} ({len(r.lrs)} steps)")
    typer.echo(f"suggested --lr {r.suggestion:.3g}  ({r.rule})\n"
               f"  smoothed loss lowest at LR {r.min_loss_lr:.3g} (a tenth of it, more cautious: "
               f"{r.min_loss_lr / 10:.3g}); {stop}\n"
               f"  fovea train's own default here: {r.default_lr:.3g}\n"
               f"curve: {r.out / 'lr_find.png'}, {r.out / 'lr_find.csv'}  ({r.seconds:.1f} s)\n"
               f"use it: {r.command()}")


@app.command(epilog=_examples(
    "fovea summary resnet18          # 11,689,512 parameters, 3.63 GFLOPs at 224 px",
    "fovea summary runs/pets         # a trained model, at its own image size",
    "fovea summary cnn --image-size 128 --depth 1",
    "fovea summary inception_v3 --num-classes 2 --json > summary.json",
))
def summary(
    model: Annotated[str, typer.Argument(help="A run folder (model.json + model.safetensors) or an architecture name (`fovea models`).")],
    image_size: Annotated[int | None, typer.Option(help="Square input size in px (default: the run's, else the architecture's own, e.g. 224 for resnet18).")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Classes of the head for an architecture name (default 1000 for timm/torchvision, 2 for mlp/cnn).")] = None,
    depth: Annotated[int | None, typer.Option(help="Show layers down to this nesting depth (0: the model as one row); deeper ones are added to their parent. Totals are always the whole model's.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: layers and totals.")] = False,
) -> None:
    """Each layer's output shape, parameters and FLOPs for one image, with the model's totals."""
    from rich.console import Console

    from fovea.models._summary import rich_table, summarize

    s = summarize(model, image_size=image_size, num_classes=num_classes)
    s.at_depth(depth)  # a bad --depth fails before anything is printed
    if as_json:
        typer.echo(json.dumps(s.to_dict(depth), indent=2))
        return
    con = Console() if sys.stdout.isatty() else Console(width=10_000)  # piped: whole lines, nothing folded
    con.print(rich_table(s, depth))
    flops = f"{s.flops / 1e9:,.2f} GFLOPs" if s.flops >= 1e9 else f"{s.flops / 1e6:,.1f} MFLOPs"
    con.print(f"parameters {s.parameters:,} ({s.trainable_parameters:,} trainable, {s.param_bytes / 1e6:,.2f} MB); "
              f"{flops} per image at {s.image_size}x{s.image_size} px", highlight=False)


@app.command("ops", epilog=_examples(
    "fovea ops list                                   # every operation, its parameters and defaults",
    "fovea ops gallery cat.jpg --out gallery.png      # all of them on one photo",
    "fovea ops clahe cat.jpg --param clip=3 --param tile=4 --out clahe.png",
    "fovea ops otsu cat.jpg --out mask.png",
    "fovea ops erode mask.png --param size=5 --param shape=ellipse",
    "fovea ops xor mask.png --mask2 other.png --out xor.png",
    "fovea ops conv cat.jpg --param kernel=vertical   # the course's edge kernels: horizontal, vertical, diagonal",
    "fovea ops conv cat.jpg --param 'kernel=1,0,-1;2,0,-2;1,0,-1'",
    "fovea ops contours coins.png --param min_area=50 # prints the count and every area",
    "fovea ops hough road.jpg --param min_length=60   # prints the segments found",
    "fovea ops gray,clahe:clip=3 cat.jpg              # preview a --preprocess chain",
))
def ops_command(
    op: Annotated[str, typer.Argument(help="An operation (`fovea ops list`), `list`, `gallery`, or a chain of steps such as gray,clahe:clip=3 (what `fovea train --preprocess` applies).")],
    image: Annotated[Path | None, typer.Argument(help="The image: any file training reads (EXIF orientation, transparency and 16-bit handled alike).")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Parameter KEY=VALUE of the operation, repeatable.")] = None,
    mask2: Annotated[Path | None, typer.Option(help="and / or / xor: the second mask, the size of IMAGE (gray >= 128 is on).")] = None,
    out: Annotated[Path | None, typer.Option(help="The PNG to write (default: IMAGE's name + -OP.png in the current folder).")] = None,
    size: Annotated[int, typer.Option(help="gallery: shrink the photo (never enlarge) to at most this many px on its longer side.")] = 320,
) -> None:
    """Classical image operations (OpenCV): colour spaces, contrast, thresholds, masks, morphology, edges, contours, lines, convolution."""
    import time

    from fovea import ops
    from fovea.data import read_image
    from fovea.errors import ImageError

    def read(path: Path) -> Any:
        try:
            return read_image(path)
        except ImageError as e:
            raise FoveaError(f"{path}: {e.reason}") from e

    if op == "list":
        from rich.console import Console
        from rich.table import Table

        t = Table("operation", "kind", "parameters (defaults)", "what it does", "step")
        for o in ops.list_ops():
            t.add_row(o.name, o.kind, o.signature(), o.help, "yes" if o.preprocess else "")
        (Console() if sys.stdout.isatty() else Console(width=200)).print(t)
        typer.echo("step: usable in `fovea train --preprocess` (steps run after the resize; a gray result gets 3 equal channels)")
        return
    if image is None:
        raise FoveaError(f"give an image: fovea ops {op} IMAGE (see fovea ops --help)")
    params: dict[str, str] = {}
    for item in param or []:
        if "=" not in item:
            raise FoveaError(f"--param expects KEY=VALUE (e.g. clip=3), got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip()] = value
    # a misspelt operation is reported before the image is read
    if "," in op or ":" in op:
        ops.parse_steps(op)
    elif op != "gallery":
        ops.get_op(op)
    rgb = read(image)
    name = op.replace(",", "+").replace(":", "_").replace("=", "")
    target = out or Path(f"{image.stem}-{name}.png")
    if target.suffix.lower() != ".png":
        raise FoveaError(f"--out is written as PNG (lossless, so masks stay 0/255): use a .png name, not {target.name!r}")
    start = time.perf_counter()
    if op == "gallery":
        if params or mask2:
            raise FoveaError("gallery shows every operation with its defaults; it takes no --param or --mask2")
        g = ops.gallery(rgb, target, size=size)
        typer.echo(f"wrote {g.path}: {g.tiles} tiles, {g.width}x{g.height} px, the operations run on the photo at "
                   f"{g.image_size[0]}x{g.image_size[1]} px ({time.perf_counter() - start:.2f} s)")
        return
    if "," in op or ":" in op:  # a chain of steps, as --preprocess would apply them
        if params or mask2:
            raise FoveaError("a chain takes its parameters inline (gray,clahe:clip=3:tile=4), not --param or --mask2")
        result = ops.preprocess(rgb, ops.parse_steps(op))
    else:
        spec = ops.get_op(op)
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            rgb = rgb[..., 0]  # a gray file (a mask, say) stays gray: mask in, mask out
        if spec.name == "contours":
            found = ops.find_contours(rgb, **spec.check_params(params))
            result = found.image
            shown = ", ".join(f"{a:g}" for a in found.areas[:20]) + (f" ... and {found.count - 20} more" if found.count > 20 else "")
            typer.echo(f"{found.count} contours (threshold {found.level}); areas in px^2, largest first: {shown or 'none'}")
        elif spec.name == "hough":
            lines = ops.find_lines(rgb, **spec.check_params(params))
            result = lines.image
            typer.echo(f"{len(lines.lines)} line segments, longest first:")
            for x1, y1, x2, y2 in lines.lines[:20]:
                typer.echo(f"  ({x1}, {y1}) - ({x2}, {y2})  {((x2 - x1) ** 2 + (y2 - y1) ** 2) ** 0.5:.1f} px")
            if len(lines.lines) > 20:
                typer.echo(f"  ... and {len(lines.lines) - 20} more")
        else:
            result = ops.apply(spec.name, rgb, read(mask2) if mask2 else None, **params)
    seconds = time.perf_counter() - start
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result).save(target, format="PNG")
    kind = "gray" if result.ndim == 2 else "RGB"
    typer.echo(f"wrote {target} ({result.shape[1]}x{result.shape[0]} {kind}, {seconds * 1000:.1f} ms)")


@app.command("explain", epilog=_examples(
    "fovea explain runs/pets cat.jpg dog.jpg                 # Grad-CAM of the predicted class: runs/pets/explain/*.png",
    "fovea explain runs/pets photos/ --method gradcam++ --target dog --out heatmaps/",
    "fovea explain runs/pets photos/ --check                 # randomization sanity check; exit 1 if the maps fail it",
    "fovea explain runs/pets cat.jpg --layer stages.1 --device cuda --json",
))
def explain_command(
    run: Annotated[Path, typer.Argument(help="A run folder (model.safetensors + model.json).")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    method: Annotated[str, typer.Option(help="gradcam | gradcam++ | cam | scorecam | eigencam | layercam")] = "gradcam",
    target: Annotated[str | None, typer.Option(help="Class to explain in every image (default: each image's predicted class).")] = None,
    layer: Annotated[str | None, typer.Option(help="Module to take the map at, e.g. stages.1 (default: the last spatial feature map).")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the overlay PNGs (default RUN/explain).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward/backward pass.")] = 32,
    check: Annotated[bool, typer.Option("--check", help="Also run the model-parameter randomization test (Adebayo et al. 2018); exit 1 if the maps fail it.")] = False,
    check_images: Annotated[int, typer.Option(help="--check uses the first N images.")] = 16,
    threshold: Annotated[float, typer.Option(help="--check passes if mean |Spearman| with the trained maps is below this at the cascade's midpoint.")] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Heatmaps of where the model looks, laid over each image as a PNG; --check tests them against randomized weights."""
    from PIL import Image
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from fovea.artifact import load
    from fovea.explain import METHODS, explain, overlay, sanity_check
    from fovea.explain._cam import single_model
    from fovea.explain._overlay import display_image

    if method not in METHODS:
        raise FoveaError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    if batch_size < 1 or check_images < 1:
        raise FoveaError("--batch-size and --check-images must be at least 1")
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.exists():
            files.append(p)
        else:
            raise FoveaError(f"{p} does not exist")
    model = single_model(load(run, device))
    x, kept, bad = model.load_images(files)
    if not kept:
        why = "; ".join(f"{files[i]}: {r}" for i, r in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        raise FoveaError(f"none of the {len(files)} files could be read as an image ({why})")
    e = explain(model, x, method=method, target=target, layer=layer, batch_size=batch_size)
    folder = out or run / "explain"
    folder.mkdir(parents=True, exist_ok=True)
    # Overlays on the square the model saw, decoded again at 224 px or more so that they are readable.
    size = max(model.image_size, 224)
    rows: list[dict[str, Any]] = []
    names: set[str] = set()
    for j, i in enumerate(kept):
        name = f"{files[i].stem}.{method}.png"
        for k in range(1, len(kept) + 1):
            if name not in names:
                break
            name = f"{files[i].stem}-{k}.{method}.png"
        names.add(name)
        Image.fromarray(overlay(display_image(files[i], x[j], size), e.maps[j])).save(folder / name)
        c = int(e.predicted[j])
        rows.append({"path": str(files[i]), "predicted": model.classes[c], "probability": float(e.probabilities[j, c]),
                     "explained": model.classes[e.targets[j]], "file": str(folder / name)})
    result = None
    if check:
        result = sanity_check(model, x[:check_images], method, target=target, layer=layer, threshold=threshold,
                              batch_size=batch_size)
    if as_json:
        doc: dict[str, Any] = {"method": method, "layer": e.layer, "images": rows,
                               "skipped": [{"path": str(files[i]), "reason": r} for i, r in bad]}
        if result is not None:
            doc["check"] = result.to_dict()
        typer.echo(json.dumps(doc, indent=2))
    else:
        con = Console() if sys.stdout.isatty() else Console(width=10_000)  # piped: whole paths, nothing folded
        t = Table("image", "predicted", "explained", "file", title=f"{method} at layer {escape(e.layer)}")
        for r in rows:
            t.add_row(escape(r["path"]), f"{escape(r['predicted'])} {r['probability']:.3f}", escape(r["explained"]),
                      escape(r["file"]))
        con.print(t)
        for i, reason in bad:
            con.print(f"[yellow]skipped[/] {escape(str(files[i]))}: {escape(reason)}", highlight=False)
        if result is not None:
            st = Table("step", "randomized (cumulative, from the output)", "mean |Spearman|", "mean SSIM",
                      title=f"randomization check on {result.n_images} images")
            for k, s in enumerate(result.steps):
                mark = "  <- verdict" if k == result.midpoint else ""
                st.add_row(str(k + 1), escape(s.randomized), f"{s.spearman:.3f}{mark}", f"{s.ssim:.3f}")
            con.print(st)
            d = result.decisive
            verdict = ("PASSES: its maps change when the model's weights do" if result.passed else
                       "FAILS: its maps barely change when the model's weights are destroyed, so they do not explain the model")
            con.print(f"{method} {verdict} (mean |Spearman| {d.spearman:.3f} at step {result.midpoint + 1} of "
                      f"{len(result.steps)}, threshold {result.threshold}; {result.steps[-1].spearman:.3f} with every "
                      f"layer randomized; {result.seconds:.1f} s)", highlight=False)
    if result is not None and not result.passed:
        raise typer.Exit(1)


@app.command("compress", epilog=_examples(
    "fovea compress runs/pets",
    "fovea compress runs/pets --methods int8-sym,onnx,ort-int8-entropy --json > table.json",
    "fovea compress runs/pets --data data/pets/test --calib 256",
    "fovea predict runs/pets/compressed/ort-int8-entropy cat.jpg"))
def compress_command(
    run: Annotated[Path, typer.Argument(help="A run folder (a float32 model).")],
    methods: Annotated[str | None, typer.Option(help="Comma-separated; default all: fp16, bf16, int8-sym, int8-asym, "
                                                     "onnx, ort-int8-minmax, ort-int8-percentile, ort-int8-entropy, "
                                                     "pt2e-x86.")] = None,
    data: Annotated[Path | None, typer.Option(help="Held-out images for accuracy (default: the run's val/test split).")] = None,
    calib: Annotated[int, typer.Option(min=8, help="Training images that calibrate static int8 (class-stratified).")] = 128,
    calib_data: Annotated[Path | None, typer.Option(help="Where the training images are, if they moved.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the artifacts (default RUN/compressed).")] = None,
    seconds: Annotated[float, typer.Option(help="Seconds of latency and of throughput measurement per model.")] = 2.0,
    rounds: Annotated[int, typer.Option(help="Interleaved passes over all models; the median is kept.")] = 3,
    gradcam_images: Annotated[int, typer.Option(help="Test images for the Grad-CAM comparison (0: skip).")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object {\"rows\": [...], ...}.")] = False,
) -> None:
    """Make the model smaller or faster every sensible way; one table of accuracy, size, latency and verdicts.

    Each method's artifact lands in RUN/compressed/METHOD and loads like any model (predict, evaluate, serve).
    The table is printed, saved as RUN/compressed/compression.json and in RUN/compressed/report.html.
    """
    from rich.console import Console

    from fovea.compress import compress
    from fovea.compress._report import SHORT, table_rows

    _setup_logging(quiet=as_json)
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods is not None else None
    if chosen == []:
        raise FoveaError("--methods is empty; name some (e.g. int8-sym,onnx) or leave it out for all")
    err = Console(stderr=True)

    def on_row(row: Any) -> None:
        if not as_json:
            err.print(f"[dim]built {row.method}: {row.size_bytes:,} bytes, top-1 {row.accuracy * 100:.1f} %[/dim]")

    result = compress(run, methods=chosen, data=data, calib=calib, calib_data=calib_data, out=out, seconds=seconds,
                      rounds=rounds, gradcam_images=gradcam_images, progress=not as_json, on_row=on_row)
    if as_json:
        from fovea.compress._compress import _json_default

        typer.echo(json.dumps(result, default=_json_default))
        return
    from rich.table import Table

    table = Table(title=f"{run} on {result['images']} images from {result['data']}")
    for h in SHORT:
        table.add_column(h, overflow="fold")
    rows = table_rows(result)
    for cells in rows:
        table.add_row(*cells[:-1])
    con = Console()
    con.print(table)
    for cells in rows:
        con.print(f"{cells[0]}: {cells[-1]}", markup=False)
    con.print(f"machine: {result['hardware_summary']}", markup=False)
    if not result["hardware"]["native_int8"]:
        con.print("this CPU has no VNNI/AMX int8 instructions: int8 will not be faster than float32 here", markup=False)
    con.print(f"report: {result['report']}", markup=False)


@app.command("export", epilog=_examples(
    "fovea export runs/pets --format onnx",
    "fovea export runs/pets --format torchscript --out deploy/pets",
    "fovea export runs/pets/compressed/ort-int8-entropy --format onnx"))
def export_command(
    run: Annotated[Path, typer.Argument(help="A run folder or a compressed artifact.")],
    format: Annotated[str, typer.Option("--format", help="onnx | torchscript | safetensors")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN/export-FORMAT).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
) -> None:
    """Write the model for another server: ONNX (+ a Triton config), TorchScript or safetensors.

    ONNX and TorchScript take uint8 images (batch, 3, S, S), resized as Fovea does (shorter side, centre crop),
    and normalize inside; --preprocess steps, if the run has any, are listed in the folder's JSON.
    """
    from fovea.compress import export

    info = export(run, format, out)
    if as_json:
        typer.echo(json.dumps(info, default=str))
        return
    typer.echo(f"wrote {info['file']} ({info['size_bytes']:,} bytes): input uint8 (batch, 3, {info['image_size']}, "
               f"{info['image_size']}), output logits over {len(info['classes'])} classes")
    if "parity" in info:
        p = info["parity"]
        typer.echo(f"parity with PyTorch on {p['images']} images: same argmax {p['same_argmax']}/{p['images']}, "
                   f"max |logit diff| {p['max_abs_logit_diff']:.2e}")
    if "triton_repository" in info:
        typer.echo(f"Triton model repository: {info['triton_repository']} (tritonserver --model-repository ...)")


@app.command("serve", epilog=_examples(
    "fovea serve runs/pets",
    "fovea serve pets:production --port 8080 --workers 2",
    "FOVEA_ADMIN_TOKEN=$(openssl rand -hex 16) fovea serve pets --db postgresql://fovea@db/fovea",
    "curl -s --data-binary @cat.jpg 'localhost:8000/v1/predict?explain=gradcam'",
    "fovea serve pets --review-below 0.8 --consensus 2     # unsure uploads to the review queue; 2 must agree",
    "curl -s --data-binary @cat.jpg -H 'Content-Type: image/jpeg' localhost:8000/v1/predict",
    "curl -s -F file=@cat.jpg -F file=@dog.png localhost:8000/v1/predict"))
def serve_command(
    model: Annotated[str, typer.Argument(help="A model folder, or a registry reference: NAME, NAME:VERSION, NAME:ALIAS.")],
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes; each loads the model.")] = 1,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass at most.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long a request may wait for others to join its batch "
                                                    "(0: only those already queued).")] = 0.0,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body, in MiB.")] = 20.0,
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds before a request is answered 504.")] = 30.0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not record predictions in the store.")] = False,
    hybrid: Annotated[bool, typer.Option("--hybrid", help="Answer from predictions `fovea batch` stored for the same "
                                                          "image bytes and model version; infer the rest.")] = False,
    db: Annotated[str | None, typer.Option("--db", envvar="FOVEA_DB", help="Database URL (default: the SQLite "
                                                                            "file in FOVEA_HOME).")] = None,
    admin_token: Annotated[str | None, typer.Option(envvar="FOVEA_ADMIN_TOKEN", help="Enables /v1/admin/* (deploy, "
                                                   "rollback) for 'Authorization: Bearer TOKEN'.")] = None,
    poll: Annotated[float, typer.Option(help="Seconds between looks at the store (production alias, deployments, "
                                             "canary steps).")] = 2.0,
    drift_every: Annotated[str, typer.Option(help="How often to test the newest answers for drift (10m; 0: never). "
                                                  "Results: /metrics, the log, FOVEA_HOME/drift/.")] = "10m",
    drift_window: Annotated[int, typer.Option(min=1, help="How many of the newest answers each drift check tests.")] = 500,
    drift_webhook: Annotated[str | None, typer.Option(help="POST each drift alert as JSON to this URL.")] = None,
    review_below: Annotated[float, typer.Option(help="Queue answers less confident than this for people to label "
                                                     "(the web app's review page; 0: none).")] = 0.0,
    consensus: Annotated[int, typer.Option(help="Reviewers who must agree before a queued image is labelled.")] = 1,
) -> None:
    """Serve a model over HTTP: /v1/predict, Open Inference Protocol v2 under /v2, Prometheus /metrics.

    Served by registry name (NAME or NAME:production), the server follows the production alias and the
    model's deployments (`fovea deploy`): shadow, canary and blue-green need no restart.
    """
    import os

    import uvicorn

    from fovea.deploy import parse_duration
    from fovea.serve._app import CONFIG_ENV, ServeConfig

    config = ServeConfig(model=model, db=db, device=device, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                         max_body_bytes=int(max_body_mb * 2**20), timeout_s=timeout, log_predictions=not no_log,
                         hybrid=hybrid, admin_token=admin_token, poll_s=poll,
                         drift_every_s=parse_duration(drift_every), drift_window=drift_window, drift_webhook=drift_webhook,
                         review_below=review_below, consensus=consensus)
    if not 0 <= review_below <= 1 or consensus < 1:
        raise FoveaError("--review-below must lie in [0, 1] and --consensus be at least 1")
    if poll <= 0:
        raise FoveaError("--poll must be positive")
    _check_servable(model, db)  # here, in one line, rather than as a failed start-up inside uvicorn
    os.environ[CONFIG_ENV] = config.to_json()
    _setup_logging()
    uvicorn.run("fovea.serve._app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="info", timeout_graceful_shutdown=10)


def _check_servable(model: str, db: str | None) -> None:
    """FoveaError unless MODEL is a model folder or a registered version whose files are intact."""
    from fovea import registry
    from fovea.artifact import META, read_meta
    from fovea.store import Store

    if (Path(model) / META).exists():
        read_meta(model)
        return
    if ":" not in model and ("/" in model or Path(model).exists()):
        raise FoveaError(f"{model} is not a model folder (no {META}) and not a registry name")
    registry.verify(registry.resolve(model, store=Store(db)))


@app.command("batch", epilog=_examples(
    "fovea batch runs/pets photos/",
    "fovea batch pets:production uploads.csv --db postgresql://fovea@db/fovea --output preds.parquet",
    "fovea batch pets photos/ --job nightly-2026-11-23",
    "fovea batch pets photos/ --engine ray --actors 8 --ray-address ray://head:10001"))
def batch_command(
    model: Annotated[str, typer.Argument(help="A model folder, or a registry reference: NAME, NAME:VERSION, NAME:ALIAS.")],
    source: Annotated[Path, typer.Argument(help="A folder of images (searched recursively) or a CSV with a path column.")],
    db: Annotated[str | None, typer.Option("--db", envvar="FOVEA_DB", help="Database URL (default: the SQLite "
                                                                            "file in FOVEA_HOME).")] = None,
    job: Annotated[str | None, typer.Option(help="Job name (default: model version + source); the same job "
                                                 "resumes where it stopped.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass and per transaction.")] = 64,
    workers: Annotated[int, typer.Option(min=1, help="Decoding threads.")] = 4,
    output: Annotated[Path | None, typer.Option(help="Also write the job's rows to this Parquet file.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    engine: Annotated[str, typer.Option(help="local (threads here) | ray (Ray Data actors; pip install 'fovea[ray]').")] = "local",
    actors: Annotated[int, typer.Option(min=1, help="--engine ray: model replicas (each loads the model).")] = 2,
    ray_address: Annotated[str | None, typer.Option(help="--engine ray: the cluster (default: start a local "
                                                         "Ray instance; 'auto': the one on this machine).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Predict every image into the database; killed and restarted, it loses and duplicates nothing."""
    from fovea.batch import run_batch

    if actors < 1:
        raise FoveaError("--actors must be at least 1")
    r = run_batch(model, source, db=db, job=job, batch_size=batch_size, workers=workers, device=device,
                  output=output, progress=not as_json, engine=engine, actors=actors, ray_address=ray_address)
    if as_json:
        typer.echo(json.dumps(r.to_dict()))
        return
    typer.echo(f"job {r.job}: {r.predicted} predicted, {r.already_done} already stored, {len(r.unreadable)} unreadable "
               f"of {r.inputs} inputs in {r.seconds:.1f} s ({r.model}:{r.version})")
    for key, reason in r.unreadable[:20]:
        typer.echo(f"  unreadable: {key}: {reason}", err=True)
    if r.output:
        typer.echo(f"parquet: {r.output}")


registry_app = typer.Typer(help="Model versions and aliases (stored in FOVEA_HOME, or the database at --db).",
                           no_args_is_help=True, rich_markup_mode="markdown")
app.add_typer(registry_app, name="registry")
DbOption = Annotated[str | None, typer.Option("--db", envvar="FOVEA_DB",
                                              help="Database URL (default sqlite:///$FOVEA_HOME/fovea.db; "
                                                   "postgresql://user:pass@host/db for several replicas).")]


def _print_versions(vs: list[Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([v.to_dict() for v in vs]))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for h in ("model", "version", "aliases", "runtime", "classes", "size", "accuracy", "created", "from"):
        table.add_column(h, overflow="fold")
    for v in vs:
        table.add_row(v.name, str(v.version), ",".join(v.aliases), v.runtime, ",".join(v.classes), str(v.image_size),
                      "—" if v.accuracy is None else f"{v.accuracy:.3f}", v.created, v.source)
    Console().print(table)


@registry_app.command("add", epilog=_examples("fovea registry add runs/pets --name pets",
                                              "fovea registry add runs/pets/compressed/ort-int8-entropy --name pets "
                                              "--alias candidate"))
def registry_add(
    run: Annotated[Path, typer.Argument(help="A model folder: a run, a compressed artifact, an ensemble.")],
    name: Annotated[str, typer.Option(help="The model's name; each add makes its next version.")],
    alias: Annotated[str | None, typer.Option(help="Point this alias (e.g. production) at the new version.")] = None,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Register a model: its files are copied into FOVEA_HOME/models/NAME/VERSION."""
    from fovea import registry
    from fovea.store import Store

    v = registry.add(run, name, alias=alias, store=Store(db))
    if as_json:
        typer.echo(json.dumps(v.to_dict()))
    else:
        typer.echo(f"registered {v.ref}" + (f" ({', '.join(v.aliases)})" if v.aliases else "") + f" at {v.path}")


@registry_app.command("list", epilog=_examples("fovea registry list", "fovea registry list --name pets --json"))
def registry_list(
    name: Annotated[str | None, typer.Option(help="Only this model's versions.")] = None,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every registered version, with its aliases."""
    from fovea import registry
    from fovea.store import Store

    _print_versions(registry.versions(name, store=Store(db)), as_json)


@registry_app.command("show", epilog=_examples("fovea registry show pets", "fovea registry show pets:2",
                                               "fovea registry show pets:production --json"))
def registry_show(
    ref: Annotated[str, typer.Argument(help="NAME (production, else newest), NAME:VERSION or NAME:ALIAS.")],
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One version: where it is, where it came from, its digest and aliases."""
    from fovea import registry
    from fovea.store import Store

    v = registry.resolve(ref, store=Store(db))
    if as_json:
        typer.echo(json.dumps(v.to_dict()))
        return
    for k, val in v.to_dict().items():
        typer.echo(f"{k:11} {', '.join(val) if isinstance(val, list) else val}")


@registry_app.command("alias", epilog=_examples("fovea registry alias pets:3 production",
                                                "fovea registry alias pets:4 candidate"))
def registry_alias(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    alias: Annotated[str, typer.Argument(help="e.g. production, candidate")],
    db: DbOption = None,
) -> None:
    """Point an alias at a version (moving it from where it pointed)."""
    from fovea import registry
    from fovea.store import Store

    name, _, version = ref.partition(":")
    if not version.isdigit():
        raise FoveaError(f"give NAME:VERSION (e.g. pets:3), not {ref!r}")
    v = registry.set_alias(name, int(version), alias, store=Store(db))
    typer.echo(f"{name}:{alias} -> {v.ref}")


@app.command("deploy", epilog=_examples(
    "fovea deploy pets:2 --strategy shadow",
    "fovea deploy pets:2 --strategy canary --percent 10 --steps 10,25,50,100 --interval 10m",
    "fovea deploy pets:2 --strategy canary --min-agreement 0.95 --max-p95-ratio 1.2",
    "fovea deploy pets:2 --strategy blue-green"))
def deploy_command(
    ref: Annotated[str, typer.Argument(help="The candidate: NAME:VERSION or NAME:ALIAS of a registered model.")],
    strategy: Annotated[str, typer.Option(help="shadow | canary | blue-green")],
    percent: Annotated[float | None, typer.Option(help="canary: the first step's share of requests.")] = None,
    steps: Annotated[str | None, typer.Option(help="canary: every step's share, rising to 100, e.g. 10,25,50,100.")] = None,
    interval: Annotated[str, typer.Option(help="canary: how long each healthy step lasts (30s, 10m, 1h).")] = "10m",
    max_error_rate: Annotated[float, typer.Option(help="Roll back when the candidate fails on more of its inputs.")] = 0.02,
    max_p95_ratio: Annotated[float, typer.Option(help="... or its p95 latency exceeds this many times production's.")] = 1.5,
    max_confidence_drop: Annotated[float, typer.Option(help="... or its mean confidence is this far below production's.")] = 0.10,
    min_agreement: Annotated[float, typer.Option(help="... or it gives production's label to fewer of the same inputs.")] = 0.90,
    min_samples: Annotated[int, typer.Option(help="Candidate answers needed before judging or stepping.")] = 50,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Roll out a new version beside production: every `fovea serve NAME` replica follows within seconds.

    shadow: the candidate answers a copy of every request, users get production's answers; compare with
    `fovea deployments`. canary: it answers a growing share (sticky per X-Client-Id), stepping after each
    healthy interval and rolled back automatically on a regression. blue-green: loaded and warmed beside
    production, then switched at once; `fovea rollback` switches back.
    """
    from fovea import deploy
    from fovea.store import Store

    try:
        plan = [float(p) for p in steps.split(",")] if steps else None
    except ValueError:
        raise FoveaError(f"--steps {steps!r}: give percentages separated by commas, e.g. 10,25,50,100") from None
    d = deploy.start(ref, strategy, percent=percent, steps=plan, interval_s=deploy.parse_duration(interval),
                     thresholds={"max_error_rate": max_error_rate, "max_p95_ratio": max_p95_ratio,
                                 "max_confidence_drop": max_confidence_drop, "min_agreement": min_agreement,
                                 "min_samples": min_samples}, store=Store(db))
    if as_json:
        typer.echo(json.dumps(d.to_dict()))
        return
    typer.echo(f"deployment #{d.id}: {d.events[-1]['message'] if d.events else d.strategy}")
    if d.strategy == "canary":
        typer.echo(f"steps {', '.join(f'{p:g}' for p in d.steps)} % every {d.interval_s:g} s while healthy")
    typer.echo(f"servers following {d.name} pick it up within seconds; watch it: fovea deployments {d.name}")


@app.command("rollback", epilog=_examples("fovea rollback pets", "fovea rollback pets --reason 'complaints about dogs'"))
def rollback_command(
    name: Annotated[str, typer.Argument(help="The model's name.")],
    reason: Annotated[str, typer.Option(help="Recorded with the rollback.")] = "rolled back by hand",
    db: DbOption = None,
) -> None:
    """End the running deployment (production unchanged), or undo the last promotion."""
    from fovea import deploy
    from fovea.store import Store

    d = deploy.rollback(name, reason=reason, store=Store(db))
    typer.echo(f"deployment #{d.id} ({d.strategy} of {d.candidate.ref if d.candidate else '?'}): {d.state}; "
               f"production is {deploy.production(name, Store(db)).ref}")


@app.command("deployments", epilog=_examples("fovea deployments", "fovea deployments pets --json"))
def deployments_command(
    name: Annotated[str | None, typer.Argument(help="Only this model's deployments.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Deployments, newest first: state, traffic share, and the running one's figures against production."""
    from rich.console import Console
    from rich.table import Table

    from fovea import deploy
    from fovea.store import Store

    store = Store(db)
    views = deploy.deployments(name, store=store, limit=limit)
    rows = []
    for d in views:
        out = d.to_dict()
        if d.state == "running":
            out["figures"] = deploy.figures_now(d, store)
        rows.append(out)
    if as_json:
        typer.echo(json.dumps({"deployments": rows}))
        return
    if not rows:
        typer.echo("no deployments yet; start one: fovea deploy NAME:VERSION --strategy canary")
        return
    table = Table(title=f"deployments in {store.safe_url}")
    for h in ("#", "model", "strategy", "state", "candidate", "production", "share", "candidate figures", "why"):
        table.add_column(h, overflow="fold")
    for d, out in zip(views, rows):
        f = out.get("figures") or {}
        c = f.get("candidate") or {}
        figures = "—"
        if c:
            agree = "—" if f.get("agreement") is None else f"{f['agreement']:.1%}"
            p95 = "—" if c.get("p95_ms") is None else f"{c['p95_ms']:.1f} ms"
            conf = "—" if c.get("mean_confidence") is None else f"{c['mean_confidence']:.3f}"
            figures = f"n={c['n']} errors={c['errors']} agree={agree} p95={p95} conf={conf}"
        share = {"shadow": "copy of 100 %", "canary": f"{d.percent:g} %", "blue-green": "switch"}[d.strategy]
        table.add_row(str(d.id), d.name, d.strategy, d.state, out["candidate"] or "—", out["production"],
                      share if d.state == "running" else "—", figures, d.reason or "")
    Console().print(table)


@app.command("drift", epilog=_examples(
    "fovea drift --model pets                      # the newest 500 answers of pets's production version",
    "fovea drift --model pets:3 --since 1h --report drift.html --webhook https://hooks.example/fovea",
    "fovea drift --model runs/pets --data uploads/2026-11-23/",
    "fovea drift --model runs/old --build-reference data/pets/val"))
def drift_command(
    model: Annotated[str, typer.Option(help="A registry reference (NAME, NAME:VERSION, NAME:ALIAS) or a model folder.")],
    window: Annotated[int, typer.Option(help="The newest N answers in the store form the window.")] = 500,
    since: Annotated[str | None, typer.Option(help="Instead: every answer of the last 30m, 6h, ...")] = None,
    data: Annotated[Path | None, typer.Option(help="Instead of the store: a folder of images to test.")] = None,
    alpha: Annotated[float, typer.Option(help="Significance level of the whole check (families corrected).")] = 0.05,
    permutations: Annotated[int, typer.Option(help="Permutations of the MMD test.")] = 1000,
    report: Annotated[Path | None, typer.Option(help="Write the HTML report here.")] = None,
    webhook: Annotated[str | None, typer.Option(help="POST the result as JSON here when drift is found.")] = None,
    fail_on_drift: Annotated[bool, typer.Option("--fail-on-drift", help="Exit 3 when drift is found (for cron).")] = False,
    build_reference: Annotated[Path | None, typer.Option(help="Save a reference for a model folder that has none, "
                                                               "from these validation images (CLASS/* folders).")] = None,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Is recent traffic still like the data the model was validated on? And, with feedback, is it still right?

    Tests a window (from the store, or --data) against the reference saved at training: MMD and per-component
    KS on penultimate-layer embeddings, KS on image statistics, chi-square on predicted labels, KS on
    confidence; with feedback, accuracy and calibration against validation.
    """
    from datetime import timedelta

    import numpy as np

    from fovea import registry
    from fovea.artifact import META, load
    from fovea.data import IMAGE_EXTENSIONS
    from fovea.monitor import (
        alert,
        check,
        header_size,
        load_reference,
        save_reference,
        window_from_files,
        window_from_store,
        write_drift_report,
    )
    from fovea.monitor import build_reference as build

    if not 0 < alpha < 1:
        raise FoveaError(f"--alpha is a significance level in (0, 1), got {alpha}")
    if permutations < 1 or window < 1:
        raise FoveaError(f"--permutations and --window must be at least 1, got {permutations} and {window}")
    folder = Path(model)
    if (folder / META).exists():
        name, version, path = folder.resolve().name, 0, folder
    else:
        from fovea.store import Store

        v = registry.resolve(model, store=Store(db))
        name, version, path = v.name, v.version, Path(v.path)
    loaded = load(path, "cpu")
    if build_reference is not None:
        if version:
            raise FoveaError("a registered version's files are sealed by their digest; build the reference in the run "
                             "folder, then register it again")
        if not build_reference.is_dir():
            raise FoveaError(f"--build-reference {build_reference}: not a folder of validation images (CLASS/*)")
        files = sorted(p for p in build_reference.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        x, kept, bad = loaded.load_images(files)
        if len(kept) < 20:  # the old reference, if any, stays: a handful of images describes no distribution
            raise FoveaError(f"--build-reference {build_reference}: {len(kept)} usable images; a reference needs at "
                             f"least 20 (a few hundred is better){f', {len(bad)} unreadable' if bad else ''}")
        index = {c: i for i, c in enumerate(loaded.classes)}
        strangers = sorted({files[i].parent.name for i in kept} - set(index))
        if strangers:
            raise FoveaError(f"--build-reference {build_reference}: folder(s) {', '.join(strangers)} are not classes of "
                             f"this model ({', '.join(loaded.classes)}); give CLASS/* folders of validation images")
        labels = np.array([index[files[i].parent.name] for i in kept])
        out = save_reference(path, build(loaded, x, [header_size(files[i]) for i in kept], labels))
        typer.echo(f"reference of {len(kept)} images saved: {out}" + (f" ({len(bad)} unreadable)" if bad else ""))
        return
    unreadable: list[tuple[str, str]] = []
    if data is not None:
        files = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FoveaError(f"no image files in {data}")
        w, unreadable = window_from_files(loaded, files)
    else:
        from fovea.deploy import parse_duration
        from fovea.store import Store

        span = timedelta(seconds=parse_duration(since)) if since else None
        w = window_from_store(Store(db), name, version, list(loaded.classes), last=None if span else window, since=span)
    reference = load_reference(path)
    result = check(loaded, path, name, version, w, alpha=alpha, permutations=permutations, reference=reference)
    result.unreadable = unreadable
    alert(result, webhook)
    if report is not None:
        write_drift_report(report, result, reference)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), default=float))
    else:
        typer.echo(result.summary())
        for t in result.drift.tests:
            mark = "  <- drift" if t.p_value < alpha else ""
            typer.echo(f"  {t.family:14} p = {t.p_value:.3g}{mark}")
        for fam, why in result.drift.skipped.items():
            typer.echo(f"  {fam:14} not run: {why}")
        if report is not None:
            typer.echo(f"report: {report}")
    if fail_on_drift and result.alert:
        raise typer.Exit(3)


def main() -> None:
    try:
        app()
    except FoveaError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:  # a path given that cannot be read or written: an existing file as --out, a full disk
        where = f": {e.filename}" if e.filename else ""
        typer.echo(f"error: {e.strerror or e}{where}", err=True)
        sys.exit(2)
    except UnicodeDecodeError as e:
        typer.echo(f"error: a file Fovea reads as text (a CSV, a model.json) is not UTF-8: {e.reason} at byte "
                   f"{e.start}; save it as UTF-8", err=True)
        sys.exit(2)
    except MemoryError:
        typer.echo("error: out of memory; use a smaller --image-size or --batch-size, or fewer images", err=True)
        sys.exit(2)
    except Exception as e:  # a bug: one line for the user, the traceback on request
        if os.environ.get("FOVEA_DEBUG"):
            raise
        typer.echo(f"error: unexpected {type(e).__name__}: {e}\n"
                   "This is a bug in Fovea; run again with FOVEA_DEBUG=1 for the traceback and report it.", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
