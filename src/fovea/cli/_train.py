"""Training: `fovea train`, `lr-find`, `compare`, `ensemble`, and `demo` (the whole job on bundled data)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fovea.cli import _render as render
from fovea.cli._common import (
    STARTED,
    CacheOption,
    DataArg,
    DeviceOption,
    QuietOption,
    app,
    examples,
    parse_arch,
    setup_logging,
)
from fovea.cli._options import given, train_options
from fovea.errors import FoveaError


@app.command(epilog=examples(
    "fovea train data/pets",
    "fovea train data/pets --model resnet18 --image-size 224 --epochs 30 --device cuda",
    "fovea train data/pets --time 2m                               # as good a model as 2 minutes allow here",
    "fovea train data/pets --model cnn --image-size 160 --epochs 200 --arch widths=48,96,192,384,512",
    "fovea train data/pets --out runs/pets --resume --epochs 60",
    "fovea train data/pets-extra --model resnet18 --mode scratch --out runs/backbone   # pretrain a backbone",
    "fovea train data/hymenoptera --weights runs/backbone --mode auto",
    "fovea train data/hymenoptera --weights resnet18.safetensors --model resnet18 --mode finetune --freeze 0.5",
    "fovea train data/pets --augment strong --dropout 0.3 --l1 1e-6 --human-error 0.02",
    "fovea train scans.csv --class-weights auto --folds 5          # imbalanced, grouped, cross-validated",
    "fovea train scans/ --sampler balanced --group-regex '^(patient\\d+)_'",
    "fovea train data/pets --seeds 5 --out runs/pets-ens           # 5 models and their ensemble",
    "fovea train data/big --cache disk                             # a set larger than memory, read in batches",
    "torchrun --nproc-per-node 4 -m fovea train data/big --batch-size 512   # 4 GPUs, DDP (docs/scaling.md)",
    "fovea train data/big --nproc 2                                # the same through torchrun, on this machine",
    "fovea train data/xrays --preprocess gray,clahe                # classical steps, kept in the model",
    "fovea train data/pets --model hog-svm                         # handcrafted features + a linear SVM, in seconds",
    "fovea train data/digits --model lstm --bidirectional --clip-grad 1   # an image read row by row",
))
@train_options()
def train(
    data: Annotated[Path | None, typer.Argument(help="A folder (DATA/CLASS/*, DATA/train|val/CLASS/*) or a CSV path,label[,group]. With --from-store: the original data, if it moved.")] = None,
    from_store: Annotated[str | None, typer.Option(help="Retrain registered model NAME on its original data plus the images confirmed in its review queue, with its production version's settings; registers the result as NAME:candidate.")] = None,
    arch: Annotated[list[str] | None, typer.Option(help="Architecture option KEY=VALUE, repeatable.")] = None,
    batch_norm: Annotated[bool | None, typer.Option("--batch-norm/--no-batch-norm", help="mlp/cnn: with or without batch norm (default with).")] = None,
    bidirectional: Annotated[bool, typer.Option("--bidirectional", help="rnn/lstm/gru: read the rows in both directions (the same as --arch bidirectional=true).")] = False,
    nproc: Annotated[int | None, typer.Option("--nproc", min=1, help="Train with N processes on this machine (DDP through torchrun --standalone: gloo on CPUs, NCCL on GPUs); --batch-size is the global batch. Several machines: run torchrun yourself (docs/scaling.md).")] = None,
    quiet: QuietOption = False,
    **options: Any,
) -> None:
    """Train a model; writes a run folder with the model, metrics, history.csv and report.html."""
    from fovea.training import run_result
    from fovea.training import train as run_train

    if nproc is not None and nproc > 1 and "WORLD_SIZE" not in os.environ:
        _torchrun(nproc)
    setup_logging(quiet)
    if from_store:
        from fovea.review import retrain

        keep = ("epochs", "lr", "batch_size", "seed", "device")  # what may differ from the production version's
        overrides = {k: v for k, v in given(options).items() if k in keep and v != {"seed": 0, "device": "auto"}.get(k)}
        v, gained = retrain(from_store, data=data, progress=not quiet, **overrides)
        render.train_result(run_result(Path(v.path) if (Path(v.path) / "metrics.json").exists() else Path(v.source)))
        typer.echo(f"labelled images added: {', '.join(f'{c} {n}' for c, n in sorted(gained.items()))}")
        typer.echo(f"registered {v.ref} ({', '.join(v.aliases)}); roll it out: fovea deploy {v.ref} --strategy canary")
        return
    if data is None:
        raise FoveaError("give the data folder (or CSV), or --from-store NAME")
    extra = parse_arch(arch)
    if batch_norm is not None:
        extra["batch_norm"] = batch_norm
    if bidirectional:
        extra["bidirectional"] = True
    run = run_train(data, **given(options), extra=extra, progress=not quiet, started=STARTED)
    if os.environ.get("RANK", "0") != "0":
        return  # torchrun: rank 0 writes the run folder and prints its result
    render.train_result(run_result(run))


@app.command("lr-find", epilog=examples(
    "fovea lr-find data/pets",
    "fovea lr-find data/pets --model mlp --image-size 32 --out runs/lrf-mlp",
    "fovea lr-find data/hymenoptera --weights runs/backbone --batch-size 32   # the fine-tuning LR",
    "fovea lr-find data/pets --optimizer adamw --steps 200 --end-lr 1",
))
@train_options("model", "weights", "pretrained", "optimizer", "batch_size", "image_size", "device", "val_fraction",
               "seed", "preprocess", "cache",
               help={"optimizer": "sgd | adam | adamw | rmsprop (default: what `fovea train` picks).",
                     "batch_size": "Batch size (default: what `fovea train` picks).",
                     "val_fraction": "Validation share when DATA has no val split (held out, as in train).",
                     "seed": "Seed: initial weights, batch order, augmentation."})
def lr_find(
    data: DataArg,
    start_lr: Annotated[float, typer.Option(help="First learning rate of the sweep.")] = 1e-7,
    end_lr: Annotated[float, typer.Option(help="Last learning rate of the sweep.")] = 10.0,
    steps: Annotated[int, typer.Option(help="Mini-batches in the sweep, one LR each (the data is cycled).")] = 100,
    out: Annotated[Path | None, typer.Option(help="Folder for lr_find.png and lr_find.csv (default runs/lr-find-DATA-TIME).")] = None,
    quiet: QuietOption = False,
    **options: Any,
) -> None:
    """The learning-rate range test: ~100 steps with a growing LR; plots the loss and suggests --lr for train."""
    from fovea.training import lr_find as run_lr_find

    setup_logging(quiet)
    r = run_lr_find(data, out=out, start_lr=start_lr, end_lr=end_lr, steps=steps, progress=not quiet, **given(options))
    render.lr_find_result(r)


@app.command(epilog=examples(
    "fovea compare data/pets",
    "fovea compare data/pets --models mlp,cnn,resnet18 --no-pretrained --epochs 20 --out runs/fc-vs-cnn",
    "fovea compare data/pets --models cnn,resnet18,mobilenetv3_small_100 --image-size 128 --device cuda",
))
@train_options("epochs", "image_size", "batch_size", "device", "seed", "pretrained", "preprocess", "clip_grad",
               help={"epochs": "Epochs for every model (default: per model, data size and device).",
                     "image_size": "Square input size in px for every model (default: per model and device).",
                     "seed": "Seed of every run.",
                     "preprocess": "Classical steps after the resize for every model, as `fovea train --preprocess` "
                                   "(e.g. gray,clahe)."})
def compare(
    data: DataArg,
    models: Annotated[str, typer.Option(help="Comma-separated architectures (`fovea models`), each trained on DATA.")] = "mlp,cnn",
    out: Annotated[Path | None, typer.Option(help="Folder for the runs (OUT/MODEL) and the table (default runs/compare-DATA-TIME).")] = None,
    quiet: QuietOption = False,
    **options: Any,
) -> None:
    """Train several models on the same data; one table of parameters, FLOPs, time and validation metrics."""
    from rich.markup import escape

    from fovea.compare import compare as run_compare
    from fovea.compare import default_out

    setup_logging(quiet)
    start = time.perf_counter()
    root = out or default_out(data)
    rows = run_compare(data, models.split(","), out=root, progress=not quiet, **given(options))
    con = render.console()
    con.print(render.compare_table(rows, title=f"fovea compare: {escape(str(data))}", width=con.width))
    for r in rows:
        if r.get("error"):
            con.print(f"[red]{escape(r['model'])} failed:[/] {escape(r['error'])}", highlight=False)
    con.print(f"whole command: {time.perf_counter() - start:.1f} s\n"
              f"table: {root / 'compare.md'} (also compare.csv, compare.json; compare.png: accuracy against training time)\n"
              f"runs:  {root}/MODEL", highlight=False)
    if all(r.get("error") for r in rows):
        raise typer.Exit(1)


@app.command(epilog=examples(
    "fovea ensemble runs/pets-s0 runs/pets-s1 runs/pets-s2 --out runs/pets-ens",
    "fovea ensemble runs/pets-cnn64 runs/pets-resnet18 --out runs/pets-ens --data data/pets   # table: members vs ensemble",
    "fovea predict runs/pets-ens cat.jpg   # an ensemble is used like any model",
))
def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="Two or more run folders with the same classes (any architectures and sizes).")],
    out: Annotated[Path, typer.Option(help="Folder to write the ensemble model into (members are copied there).")],
    data: Annotated[Path | None, typer.Option(help="Evaluate the ensemble and each member on DATA (its test, else val, split).")] = None,
    quiet: QuietOption = False,
) -> None:
    """Combine trained models into one model that averages their class probabilities."""
    from fovea.artifact import read_meta
    from fovea.ensemble import make_ensemble

    setup_logging(quiet)
    path = make_ensemble(runs, out, data=data, progress=not quiet)
    metrics = read_meta(path).get("metrics")
    if metrics:
        render.console().print(render.ensemble_table(metrics))
    typer.echo(f"ensemble of {len(runs)} models: {path}  (fovea predict {path} IMAGE)")


@app.command(epilog=examples("fovea demo", "fovea demo --out runs/demo --epochs 5"))
def demo(
    out: Annotated[Path, typer.Option(help="Run folder to write.")] = Path("runs/demo"),
    data: Annotated[Path | None, typer.Option(help="Data to use instead of the one found or made.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override the number of epochs.")] = None,
) -> None:
    """Find or make a small real data set, train on it, evaluate, predict a few images, show the report."""
    from fovea.cli._demo import run_demo

    setup_logging()
    run_demo(out=out, data=data, epochs=epochs)


@app.command("calibrate-unknown", epilog=examples(
    "fovea calibrate-unknown runs/pets data/pets                  # fit on train/, calibrate on val/",
    "fovea calibrate-unknown runs/pets data/pets --keep 0.99      # refuse fewer known images",
    "fovea calibrate-unknown runs/old data/pets --score mahalanobis",
    "fovea calibrate-unknown runs/pets-ens data/pets              # an ensemble: each member, then the mean",
    "fovea calibrate-unknown runs/big data/big --cache disk       # a set larger than memory, read in blocks"))
def calibrate_unknown(
    run: Annotated[Path, typer.Argument(help="A model folder (a run or an ensemble; not a registered version).")],
    data: DataArg,
    keep: Annotated[float, typer.Option(help="Share of known validation images the threshold keeps.")] = 0.95,
    score: Annotated[str | None, typer.Option(help="The unknown-image score (default: the run's, else the default; "
                                                   "see docs/unknown.md).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Validation share when DATA has no val split.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of that split.")] = 0,
    cache: CacheOption = "auto",
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Give a model its unknown-image answer, or a new threshold: fit the score on DATA's training split and set the
    threshold that keeps --keep of its validation split. Images of none of the classes then answer `unknown`."""
    from fovea.artifact import read_meta
    from fovea.training import calibrate_unknown as run_calibrate

    setup_logging(quiet)
    if score is None:  # keep the score the model already has, refitted on this data
        given = (read_meta(run).get("unknown") or {}).get("score")
        score = given if given not in (None, "ensemble") else None
    entry = run_calibrate(run, data, keep=keep, score=score, val_fraction=val_fraction, seed=seed, device=device,
                          progress=not quiet, cache=cache)
    typer.echo(f"{run}: unknown score {entry['score']}, threshold {entry['threshold']:.4g} keeps "
               f"{entry['kept']:.1%} of {entry['calibrated_on']} known validation images (asked {keep:.0%})")


def _torchrun(nproc: int) -> None:
    """``fovea train … --nproc N``: the same command again under ``torchrun --standalone --nproc-per-node N``.

    The processes' own lines pass through; torchrun's report of a failed process (its Python traceback and log
    lines about the agent) is replaced by one line, since each process has already said what went wrong."""
    import re
    import subprocess

    args, skip = [], False
    for a in sys.argv[sys.argv.index("train") + 1 :]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "fovea", "train", *args]
    agent_log = re.compile(r"^[IWE]\d{4} .*torch/distributed/")
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) as p:
        assert p.stderr is not None
        quiet, debug = False, bool(os.environ.get("FOVEA_DEBUG"))  # FOVEA_DEBUG: every line, tracebacks too
        for line in p.stderr:
            quiet = not debug and (quiet or line.startswith("Traceback (most recent call last):"))
            if not quiet and not agent_log.match(line):
                sys.stderr.write(line)
    if p.returncode:
        sys.stderr.write(f"error: a training process failed (torchrun exit code {p.returncode}); its message is above\n")
        raise SystemExit(2)
    raise SystemExit(0)
