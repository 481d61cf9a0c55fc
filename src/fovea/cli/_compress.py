"""Making a model smaller and taking it elsewhere: `fovea compress`, `export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fovea.cli import _render as render
from fovea.cli._common import JsonOption, app, echo_json, examples, setup_logging
from fovea.errors import FoveaError


@app.command("compress", epilog=examples(
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
    as_json: JsonOption = False,
) -> None:
    """Make the model smaller or faster every sensible way; one table of accuracy, size, latency and verdicts.

    Each method's artifact lands in RUN/compressed/METHOD and loads like any model (predict, evaluate, serve).
    The table is printed, saved as RUN/compressed/compression.json and in RUN/compressed/report.html.
    """
    from fovea.compress import compress

    setup_logging(quiet=as_json)
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods is not None else None
    if chosen == []:
        raise FoveaError("--methods is empty; name some (e.g. int8-sym,onnx) or leave it out for all")
    err = render.console_stderr()

    def on_row(row: Any) -> None:
        if not as_json:
            err.print(f"[dim]built {row.method}: {row.size_bytes:,} bytes, top-1 {row.accuracy * 100:.1f} %[/dim]")

    result = compress(run, methods=chosen, data=data, calib=calib, calib_data=calib_data, out=out, seconds=seconds,
                      rounds=rounds, gradcam_images=gradcam_images, progress=not as_json, on_row=on_row)
    if as_json:
        echo_json(result)
    else:
        render.compression(run, result)


@app.command("export", epilog=examples(
    "fovea export runs/pets --format onnx",
    "fovea export runs/pets --format torchscript --out deploy/pets",
    "fovea export runs/pets/compressed/ort-int8-entropy --format onnx"))
def export_command(
    run: Annotated[Path, typer.Argument(help="A run folder or a compressed artifact.")],
    format: Annotated[str, typer.Option("--format", help="onnx | torchscript | safetensors")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN/export-FORMAT).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Write the model for another server: ONNX (+ a Triton config), TorchScript or safetensors.

    ONNX and TorchScript take uint8 images (batch, 3, S, S), resized as Fovea does (shorter side, centre crop),
    and normalize inside; --preprocess steps, if the run has any, are listed in the folder's JSON.
    """
    from fovea.compress import export

    info = export(run, format, out)
    if as_json:
        echo_json(info, default=str)
        return
    typer.echo(f"wrote {info['file']} ({info['size_bytes']:,} bytes): input uint8 (batch, 3, {info['image_size']}, "
               f"{info['image_size']}), output logits over {len(info['classes'])} classes")
    if "parity" in info:
        p = info["parity"]
        typer.echo(f"parity with PyTorch on {p['images']} images: same argmax {p['same_argmax']}/{p['images']}, "
                   f"max |logit diff| {p['max_abs_logit_diff']:.2e}")
    if "triton_repository" in info:
        typer.echo(f"Triton model repository: {info['triton_repository']} (tritonserver --model-repository ...)")
