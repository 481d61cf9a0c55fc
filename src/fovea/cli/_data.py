"""Looking at data, architectures and images: `fovea check`, `models`, `summary`, `ops`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from fovea._duration import parse_duration
from fovea.cli import _render as render
from fovea.cli._common import (
    DataArg,
    DbOption,
    DeviceOption,
    JsonOption,
    app,
    echo_json,
    examples,
    parse_arch,
    parse_params,
)
from fovea.errors import FoveaError


@app.command(epilog=examples("fovea check data/pets", "fovea check data/pets --json > check.json",
                             "fovea check labels.csv --val-fraction 0.25",
                             "fovea check scans/ --group-regex '^(patient\\d+)_'   # one patient, one split",
                             "fovea check data/pets --labels                 # suspected label errors (4 folds, 10 min)",
                             "fovea check data/pets --labels --weights runs/backbone --time 3m",
                             "fovea check data/pets --labels --review pets   # suspects to the review queue"))
def check(
    data: DataArg,
    as_json: JsonOption = False,
    val_fraction: Annotated[float, typer.Option(help="Validation share when DATA has no val split.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of that split.")] = 0,
    near_threshold: Annotated[int, typer.Option(min=0, max=64, help="Max Hamming distance of 64-bit perceptual hashes for a near-duplicate.")] = 4,
    group_regex: Annotated[str | None, typer.Option(help="Group (patient, source) = this regex's first group on the file name; flags groups in two splits.")] = None,
    labels: Annotated[bool, typer.Option("--labels", help="Find images whose label is likely wrong: K-fold cross-fitted models, then confident learning (cleanlab).")] = False,
    folds: Annotated[int, typer.Option(min=2, max=20, help="--labels: folds of the cross-fitting.")] = 4,
    rounds: Annotated[int, typer.Option(min=1, max=5, help="--labels: rounds of cross-fitting; each leaves the last one's suspects out of training.")] = 1,
    time: Annotated[float | None, typer.Option(parser=parse_duration, metavar="DURATION", help="--labels: time for all the folds (90s, 5m); default on a CPU 10m.")] = None,
    model: Annotated[str | None, typer.Option(help="--labels: architecture of the folds' models (default cnn).")] = None,
    weights: Annotated[list[str] | None, typer.Option(help="--labels: start each fold from these weights (a run folder or file); repeat it for an ensemble of backbones (one head each, probabilities averaged).")] = None,
    mode: Annotated[str | None, typer.Option(help="--labels: with --weights, scratch | features | finetune | auto.")] = None,
    epochs: Annotated[int | None, typer.Option(help="--labels: epochs per fold (default: from the time budget).")] = None,
    image_size: Annotated[int | None, typer.Option(help="--labels: input size of the folds' models.")] = None,
    corrections: Annotated[str | None, typer.Option(help="--labels: a corrections file applied first (default: DATA's own from the review queue; none: ignore).")] = None,
    top: Annotated[int, typer.Option(min=1, help="--labels: suspects printed.")] = 24,
    review: Annotated[str | None, typer.Option(help="--labels: send the suspects to this model's review queue (a registered NAME).")] = None,
    device: DeviceOption = "auto",
    db: DbOption = None,
) -> None:
    """Look at a data set: counts, imbalance, sizes and modes, unreadable files, duplicates and leakage; with
    --labels, the images whose given label is most likely wrong."""
    if labels:
        from fovea.labels import check_labels, suspects

        result = check_labels(data, folds=folds, rounds=rounds, time=time, val_fraction=val_fraction, seed=seed,
                              group_regex=group_regex, corrections=corrections, progress=not as_json, model=model,
                              weights=weights, mode=mode, epochs=epochs, image_size=image_size, device=device)
        if review:
            from fovea import review as queue
            from fovea.store import Store

            store = Store(db)
            result["queued"] = sum(queue.enqueue_suspect(store, review, result["data"], r["path"], r["given"],
                                                         r["probabilities"], suggested=r["suggested"],
                                                         quality=r["quality"]) is not None
                                   for r in suspects(result))
        if as_json:
            echo_json(result, indent=2)
        else:
            render.label_issues(result, top)
        return
    if review:
        raise FoveaError("--review sends suspected label errors to the queue: add --labels")
    from fovea.data import check as run_check

    report = run_check(data, val_fraction=val_fraction, seed=seed, near_threshold=near_threshold,
                       progress=not as_json, group_regex=group_regex)
    if as_json:
        echo_json(report, indent=2)
    else:
        render.check_report(report)


@app.command(epilog=examples("fovea models", "fovea models --source fovea", "fovea models --filter resnet",
                             "fovea models --filter svm      # the classical models: features -> a linear SVM"))
def models(
    source: Annotated[str, typer.Option(help="all | fovea | torchvision | timm")] = "all",
    filter: Annotated[str | None, typer.Option("--filter", help="Only names containing this text.")] = None,
) -> None:
    """List every architecture Fovea can train."""
    from fovea.models import describe_model, list_models

    if source not in ("all", "fovea", "torchvision", "timm"):
        raise FoveaError(f"--source must be all, fovea, torchvision or timm, not {source!r}")
    names = [n for n in list_models(source) if not filter or filter in n]
    for n in names:  # the name first (scripts take the first word); Fovea's own say what they are
        about = describe_model(n)
        typer.echo(f"{n:<16} {about}" if about else n)
    typer.echo(f"{len(names)} models", err=True)


@app.command(epilog=examples(
    "fovea summary resnet18          # 11,689,512 parameters, 3.63 GFLOPs at 224 px",
    "fovea summary runs/pets         # a trained model, at its own image size",
    "fovea summary cnn --image-size 128 --depth 1  # an architecture, no run needed",
    "fovea summary cnn --image-size 160 --arch widths=48,96,192,384,512   # with fovea train's --arch options",
    "fovea summary inception_v3 --num-classes 2 --json > summary.json",
))
def summary(
    model: Annotated[str, typer.Argument(help="A run folder (model.json + model.safetensors) or an architecture name (`fovea models`).")],
    image_size: Annotated[int | None, typer.Option(help="Square input size in px (default: the run's, else the architecture's own, e.g. 224 for resnet18).")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Classes of the head for an architecture name (default 1000 for timm/torchvision, 2 for mlp/cnn).")] = None,
    depth: Annotated[int | None, typer.Option(help="Show layers down to this nesting depth (0: the model as one row); deeper ones are added to their parent. Totals are always the whole model's.")] = None,
    arch: Annotated[list[str] | None, typer.Option(help="Architecture option KEY=VALUE, repeatable, as for `fovea train` (an architecture name only).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Each layer's output shape, parameters and FLOPs for one image, with the model's totals."""
    from fovea.models import summarize

    s = summarize(model, image_size=image_size, num_classes=num_classes, arch=parse_arch(arch))
    s.at_depth(depth)  # a bad --depth fails before anything is printed
    if as_json:
        echo_json(s.to_dict(depth), indent=2)
    else:
        render.summary_table(s, depth)


@app.command("ops", epilog=examples(
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
    from PIL import Image

    from fovea import ops
    from fovea.data import read_image
    from fovea.errors import ImageError

    def read(path: Path) -> object:
        try:
            return read_image(path)
        except ImageError as e:
            raise FoveaError(f"{path}: {e.reason}") from e

    if op == "list":
        render.ops_table(ops.list_ops())
        return
    if image is None:
        raise FoveaError(f"give an image: fovea ops {op} IMAGE (see fovea ops --help)")
    params = parse_params(param)
    if ops.is_chain(op):  # a misspelt operation is reported before the image is read
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
        g = ops.gallery(rgb, target, size=size)  # type: ignore[arg-type]
        typer.echo(f"wrote {g.path}: {g.tiles} tiles, {g.width}x{g.height} px, the operations run on the photo at "
                   f"{g.image_size[0]}x{g.image_size[1]} px ({time.perf_counter() - start:.2f} s)")
        return
    result = ops.run(op, rgb, params, read(mask2) if mask2 else None)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    for line in result.lines:
        typer.echo(line)
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.image).save(target, format="PNG")
    kind = "gray" if result.image.ndim == 2 else "RGB"
    typer.echo(f"wrote {target} ({result.image.shape[1]}x{result.image.shape[0]} {kind}, {seconds * 1000:.1f} ms)")
