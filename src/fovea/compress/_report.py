"""RUN/compressed/report.html: the table, the quantization error per layer, calibrations, Grad-CAM side by side."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fovea._html import CSS, table_html

if TYPE_CHECKING:
    from fovea.compress._gradcam import GradCamCheck


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, fmt)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """The table's cells as text (the CLI prints the same)."""
    out = []
    for r in result["rows"]:
        ci = r.get("accuracy_95ci") or [None, None]
        acc = (f"{_num(r['accuracy'] * 100 if r['accuracy'] is not None else None, '.1f')} "
               f"[{_num(ci[0] * 100 if ci[0] is not None else None, '.1f')}, "
               f"{_num(ci[1] * 100 if ci[1] is not None else None, '.1f')}]")
        out.append([
            r["method"] + ("" if r["device"] == "cpu" else f" ({r['device']})"),
            f"{r['size_bytes']:,}" if r["size_bytes"] else "—",
            acc,
            _num(r.get("agreement") * 100 if r.get("agreement") is not None else None, ".1f"),
            _num(r["p50_ms"], ".2f"), _num(r["p95_ms"], ".2f"), _num(r["throughput"], ",.0f"),
            _num(r.get("gradcam_rho"), ".2f"),
            r["verdict"],
        ])
    return out


SHORT = ["method", "bytes", "top-1 % [95 % CI]", "agree %", "p50 ms", "p95 ms", "img/s @32", "CAM rho"]
HEADER = ["method", "size (bytes)", "top-1 % [95 % CI]", "agrees with fp32 %", "p50 ms (1 image)", "p95 ms",
          "images/s (batch 32)", "Grad-CAM rho", "verdict"]


def _overlays(cams: GradCamCheck) -> str:
    from PIL import Image

    from fovea.explain import overlay

    methods = list(cams.maps)
    images = cams.prepared.permute(0, 2, 3, 1).numpy()
    size = max(96, images.shape[1])
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    body = []
    for i, img in enumerate(images):
        pic = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
        cells = []
        for m in methods:
            buf = io.BytesIO()
            Image.fromarray(overlay(pic, cams.maps[m][i])).save(buf, format="PNG")
            cells.append(f"<td><img alt='' width='{size}' src='data:image/png;base64,"
                         f"{base64.b64encode(buf.getvalue()).decode()}'></td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def write_report(path: Path, result: dict[str, Any], cams: GradCamCheck | None) -> Path:
    from fovea.compress._gradcam import GRADCAM_FLAG

    parts = [f"<!doctype html><meta charset='utf-8'><title>Compression of {html.escape(Path(result['run']).name)}"
             f"</title><style>{CSS}</style>", f"<h1>Compression of {html.escape(result['run'])}</h1>",
             f"<p>{result['images']} test images from <code>{html.escape(result['data'])}</code>; "
             f"{result['calibration_images']} calibration images (class-stratified, from the training split). "
             f"Machine: {html.escape(result['hardware_summary'])}.</p>"]
    hw = result["hardware"]
    if not hw["native_int8"]:
        parts.append("<p class='warn'>This CPU has no VNNI or AMX int8 instructions: int8 inference is not expected "
                     "to be faster than float32 here, whatever the file size.</p>")
    parts.append("<h2>Every method</h2>" + table_html(table_rows(result), HEADER))
    parts.append("<p>Latency: one image, median and 95th percentile; throughput: batches of 32; both the network "
                 "alone (normalization included, no test-time augmentation), after warm-up. Accuracy: the model's "
                 "full prediction path (with its recorded TTA), Wilson 95 % interval. Size: the model file.</p>")
    for r in result["rows"]:
        d = r.get("details") or {}
        if d.get("layers"):
            layers = sorted(d["layers"], key=lambda e: e["sqnr_db"])
            parts.append(f"<h2>{html.escape(r['method'])}: quantization error per layer</h2>"
                         f"<p>Median SQNR {_num(d.get('median_sqnr_db'), '.1f')} dB over {len(layers)} weight tensors; "
                         f"the largest error is in <code>{html.escape(layers[0]['name'])}</code>. Lowest first:</p>"
                         + table_html([[e["name"], "×".join(map(str, e["shape"])), _num(e["sqnr_db"], ".1f"),
                                    _num(e["mean_abs_error"], ".2e"), _num(e["max_abs_error"], ".2e")]
                                   for e in layers[:12]],
                                  ["weight", "shape", "SQNR dB", "mean |error|", "max |error|"]))
    calib = [r for r in result["rows"] if r["method"].startswith("ort-int8-") and r["device"] == "cpu"
             and r.get("accuracy") is not None]  # a method that failed to build has no figures
    if calib:
        parts.append("<h2>ONNX Runtime int8: calibrations compared</h2>" + table_html(
            [[r["method"].removeprefix("ort-int8-"), _num(r["accuracy"] * 100, ".1f"), _num(r["agreement"] * 100, ".1f"),
              f"{(r.get('details') or {}).get('batchnorm_modules', '—')} in PyTorch → "
              f"{(r.get('details') or {}).get('batchnorm_after', '—')} in the int8 graph",
              (r.get("details") or {}).get("quantized_nodes", "—")] for r in calib],
            ["calibration", "top-1 %", "agrees with fp32 %", "BatchNorm nodes (folded)", "quantized tensors"]))
    onnx = next((r for r in result["rows"] if r["method"] == "onnx"), None)
    if onnx and (onnx.get("details") or {}).get("parity"):
        p = onnx["details"]["parity"]
        parts.append(f"<h2>ONNX parity</h2><p>On {p['images']} images: same argmax as PyTorch on {p['same_argmax']}; "
                     f"max |logit difference| {p['max_abs_logit_diff']:.2e}.</p>")
    if cams is not None:
        parts.append(f"<h2>Where each model looks</h2><p>Grad-CAM of the class the float32 model predicts, at "
                     f"<code>{html.escape(cams.layer_name)}</code>, on {len(cams.images)} test images. A method whose "
                     f"median rank correlation with float32 falls under {GRADCAM_FLAG} is flagged in the table. "
                     "ONNX models run without gradients: their maps come from finite differences through the graph after the "
                     "layer (the same maps as PyTorch's on the float32 export). The compiled PT2E program has none.</p>"
                     + _overlays(cams))
    path.write_text("\n".join(parts))
    return path
