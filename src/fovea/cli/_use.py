"""Using a trained model: `fovea evaluate`, `predict`, `explain`, `similar`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fovea.cli import _render as render
from fovea.cli._common import (
    CacheOption,
    DbOption,
    DeviceOption,
    JsonOption,
    ModelRefArg,
    NoUnknownOption,
    PathsArg,
    RunArg,
    app,
    echo_json,
    examples,
    expand_files,
    setup_logging,
)
from fovea.errors import FoveaError


@app.command(epilog=examples("fovea evaluate runs/pets data/pets", "fovea evaluate runs/pets data/pets/val --json",
                             "fovea evaluate runs/scans data/scans --human-error 0.05   # bias or variance?",
                             "fovea evaluate runs/pets data/pets --unknown data/ants --unknown data/digits --report r.html",
                             "fovea evaluate runs/big data/big --cache disk   # a set larger than memory, in blocks"))
def evaluate(
    run: RunArg,
    data: Annotated[Path, typer.Argument(help="Class folders (all evaluated) or a split layout (its test, else val, split).")],
    as_json: JsonOption = False,
    report: Annotated[Path | None, typer.Option(help="Also write an HTML report here.")] = None,
    device: DeviceOption = "auto",
    human_error: Annotated[float | None, typer.Option(help="Human-level error (e.g. 0.05) for the bias/variance diagnosis.")] = None,
    unknown: Annotated[list[Path] | None, typer.Option("--unknown", help="A folder of images of none of the classes, "
                                                       "repeatable: how well the model tells them from DATA.")] = None,
    no_unknown: NoUnknownOption = False,
    cache: CacheOption = "auto",
) -> None:
    """Accuracy, balanced accuracy, precision/recall/F1, ROC-AUC and the confusion matrix on held-out data;
    with --unknown, how well the model refuses images of none of its classes."""
    from fovea.evaluation import evaluate as run_eval

    setup_logging(quiet=as_json)
    if human_error is not None and not 0 <= human_error < 1:
        raise FoveaError(f"--human-error is an error rate in [0, 1), got {human_error}")
    m = run_eval(run, data, device=device, report=report, progress=not as_json, human_error=human_error,
                 unknown=unknown or (), open_set=not no_unknown, cache=cache)
    m.pop("roc_curves", None)
    if as_json:
        echo_json(m, indent=2)
    else:
        render.evaluation(m)


@app.command(epilog=examples("fovea predict runs/pets cat.jpg dog.png", "fovea predict runs/pets photos/ --json --top-k 2",
                             "fovea predict runs/pets photos/ --no-unknown    # always one of the classes"))
def predict(
    run: RunArg,
    paths: PathsArg,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    top_k: Annotated[int, typer.Option(min=1, help="Show the k most likely classes.")] = 1,
    device: DeviceOption = "auto",
    no_unknown: NoUnknownOption = False,
) -> None:
    """Label images: the class (or `unknown`: none of them), its probability and every class's probability."""
    from fovea.runtime import load

    files = expand_files(paths)
    if not files:
        raise FoveaError("no files to predict")
    model = load(run, device, unknown=not no_unknown)
    skipped: list[tuple[str, str]] = []
    for i in range(0, len(files), 256):  # a folder of any size, a chunk of decoded images at a time
        preds, bad = model.predict(files[i : i + 256])
        skipped += bad
        for pr in preds:
            top = sorted(pr.probabilities.items(), key=lambda kv: -kv[1])[:top_k]
            if as_json:
                echo_json({**pr.to_dict(), "top_k": [{"label": k, "probability": v} for k, v in top]})
            elif pr.unknown:
                typer.echo(f"{pr.path}\tunknown  (none of the classes: score {pr.unknown_score:.3g} > threshold "
                           f"{pr.unknown_threshold:.3g}; otherwise " + "  ".join(f"{k} {v:.3f}" for k, v in top) + ")")
            else:
                typer.echo(f"{pr.path}\t" + "  ".join(f"{k} {v:.3f}" for k, v in top))
    for path, reason in skipped:
        if as_json:
            echo_json({"path": path, "error": reason})
        else:
            typer.echo(f"{path}\tskipped: {reason}", err=True)
    if skipped and len(skipped) == len(files):
        raise typer.Exit(1)


@app.command("explain", epilog=examples(
    "fovea explain runs/pets cat.jpg dog.jpg                 # Grad-CAM of the predicted class: runs/pets/explain/*.png",
    "fovea explain runs/pets photos/ --method gradcam++ --target dog --out heatmaps/",
    "fovea explain runs/pets photos/ --check                 # randomization sanity check; exit 1 if the maps fail it",
    "fovea explain runs/pets cat.jpg --layer stages.1 --device cuda --json",
))
def explain_command(
    run: RunArg,
    paths: PathsArg,
    method: Annotated[str, typer.Option(help="gradcam | gradcam++ | cam | scorecam | eigencam | layercam")] = "gradcam",
    target: Annotated[str | None, typer.Option(help="Class to explain in every image (default: each image's predicted class).")] = None,
    layer: Annotated[str | None, typer.Option(help="Module to take the map at, e.g. stages.1 (default: the last spatial feature map).")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the overlay PNGs (default RUN/explain).")] = None,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward/backward pass.")] = 32,
    check: Annotated[bool, typer.Option("--check", help="Also run the model-parameter randomization test (Adebayo et al. 2018); exit 1 if the maps fail it.")] = False,
    check_images: Annotated[int, typer.Option(min=1, help="--check uses the first N images.")] = 16,
    threshold: Annotated[float, typer.Option(help="--check passes if mean |Spearman| with the trained maps is below this at the cascade's midpoint.")] = 0.5,
    as_json: JsonOption = False,
) -> None:
    """Heatmaps of where the model looks, laid over each image as a PNG; --check tests them against randomized weights."""
    from fovea.explain import METHODS, explain_files, sanity_check, single_model
    from fovea.runtime import load

    if method not in METHODS:  # before the model is loaded
        raise FoveaError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    files = expand_files(paths)
    model = single_model(load(run, device))
    o = explain_files(model, files, out or run / "explain", method=method, target=target, layer=layer,
                      batch_size=batch_size)
    result = None
    if check:
        result = sanity_check(model, o.images[:check_images], method, target=target, layer=layer, threshold=threshold,
                              batch_size=batch_size)
    if as_json:
        doc: dict[str, Any] = {"method": method, "layer": o.layer, "images": o.rows,
                               "skipped": [{"path": p, "reason": r} for p, r in o.skipped]}
        if result is not None:
            doc["check"] = result.to_dict()
        echo_json(doc, indent=2)
    else:
        render.explained(o, method, result)
    if result is not None and not result.passed:
        raise typer.Exit(1)


@app.command("similar", epilog=examples(
    "fovea similar runs/pets cat.jpg                     # the 10 nearest training images, with labels",
    "fovea similar runs/pets photos/ --k 5 --json",
    "fovea similar pets:production query.png --in data/archive    # search another folder (labelled or not)",
))
def similar_command(
    run: ModelRefArg,
    paths: PathsArg,
    k: Annotated[int, typer.Option("--k", min=1, max=1000, help="Neighbours per image.")] = 10,
    data: Annotated[Path | None, typer.Option("--in", help="Images to search: a data set (DATA/CLASS/*, "
                                              "DATA/train|val/CLASS/*, a CSV) or any folder of images (default: the "
                                              "model's training data, every split).")] = None,
    as_json: JsonOption = False,
    device: DeviceOption = "auto",
    db: DbOption = None,
) -> None:
    """The nearest images to each given image by the model's own embedding, with their labels and cosine
    distances (0: the same). The gallery is built once per model and data set and kept in FOVEA_HOME."""
    from fovea import model_registry
    from fovea.similar import find_similar
    from fovea.store import Store

    setup_logging(quiet=as_json)
    files = expand_files(paths)  # a wrong path fails here, before any model or gallery is loaded
    if not files:
        raise FoveaError("no image files given")
    _, _, model, _ = model_registry.open_model(run, device, store=Store(db) if db else None)
    found = find_similar(model, files, k=k, data=data, progress=not as_json)
    if as_json:
        echo_json(found.to_dict(), indent=2)
    else:
        render.similar(found)
