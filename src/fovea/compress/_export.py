"""``fovea export RUN --format onnx|torchscript|safetensors``: a model for another server (Triton, TorchServe, ...).

Every format takes uint8 images (N, 3, S, S) and normalizes inside, except safetensors (weights only, with
the preprocessing in its header). ONNX comes with a Triton ``config.pbtxt`` and a parity check against
PyTorch; the ONNX and safetensors folders are Fovea artifacts too (``fovea predict`` opens them).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from fovea.artifact import FORMAT, META, ONNX_FILE, UNKNOWN_FILE, WEIGHTS, read_meta, write_meta
from fovea.errors import FoveaError
from fovea.runtime import TorchModel, load_single

FORMATS = ("onnx", "torchscript", "safetensors")


def _triton_config(name: str, image_size: int, n_classes: int) -> str:
    """A Triton model configuration for the exported ONNX file (dynamic batching on)."""
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 64\n'
            f'input [ {{ name: "images" data_type: TYPE_UINT8 dims: [ 3, {image_size}, {image_size} ] }} ]\n'
            f'output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ {n_classes} ] }} ]\n'
            "dynamic_batching { max_queue_delay_microseconds: 2000 }\n")


def export(run: str | Path, format: str, out: str | Path | None = None) -> dict[str, Any]:
    """Write the model of ``run`` as ``format`` into ``out`` (default RUN/export-FORMAT); returns what was written."""
    from fovea.compress._compress import meta_for, parity
    from fovea.compress._onnx import Normalized, export_onnx

    if format not in FORMATS:
        raise FoveaError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    run = Path(run)
    meta = read_meta(run)
    if "ensemble" in meta:
        raise FoveaError(f"{run} is an ensemble (several networks); export its members one by one ({run}/members)")
    out = Path(out) if out is not None else run / f"export-{format}"
    model = load_single(run, "cpu")
    if out.resolve() == run.resolve():
        raise FoveaError("--out must not be the run folder itself")
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"format": format, "folder": str(out), "image_size": model.image_size,
                            "classes": model.classes}
    if format == "onnx" and (meta.get("compression") or {}).get("runtime") == "onnxruntime":
        shutil.copy2(run / ONNX_FILE, out / ONNX_FILE)  # already ONNX (e.g. ONNX Runtime int8): as it is
        shutil.copy2(run / META, out / META)
        info["file"] = str(out / ONNX_FILE)
    elif not isinstance(model, TorchModel):
        raise FoveaError(f"{run} runs in {meta['compression']['runtime']}, not PyTorch; export the run it was "
                         "compressed from, or use its own file")
    elif format == "onnx":
        export_onnx(model.net, model.mean, model.std, model.image_size, out / ONNX_FILE)
        write_meta(out, meta_for(model.meta, "onnx", "onnxruntime", {"exported_from": str(run)}))
        exported = load_single(out, "cpu")
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (16, 3, model.image_size, model.image_size), generator=g, dtype=torch.uint8)
        info["parity"] = parity(model, exported, x)
        if model.answers_unknown:
            info["unknown"] = (f"not carried: ONNX Runtime exposes no embedding for the {meta['unknown']['score']} "
                               f"score; fovea calibrate-unknown {out} DATA gives it a logits-only one")
        triton = out / "triton" / run.name / "1"
        triton.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / ONNX_FILE, triton / ONNX_FILE)
        (triton.parent / "config.pbtxt").write_text(_triton_config(run.name, model.image_size, len(model.classes)))
        info["file"] = str(out / ONNX_FILE)
        info["triton_repository"] = str(triton.parent.parent)
    elif format == "torchscript":
        wrapped = Normalized(model.net.float().cpu().eval(), model.mean, model.std).eval()
        example = torch.zeros(1, 3, model.image_size, model.image_size, dtype=torch.uint8)
        # TorchScript is deprecated in PyTorch 2.11 but still what TorchServe and Triton's PyTorch backend load
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(wrapped, example, check_trace=False)
            torch.jit.save(traced, str(out / "model.pt"))
        (out / "fovea.json").write_text(json.dumps(
            {"classes": model.classes, "input": {"dtype": "uint8", "shape": ["batch", 3, model.image_size, model.image_size]},
             "preprocessing": model.meta["preprocessing"], "output": "logits"}, indent=2))
        info["file"] = str(out / "model.pt")
    else:  # safetensors: float32 weights, with what a loader needs in the header
        from safetensors.torch import save_file

        state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
                 for k, v in model.net.state_dict().items()}
        header = {"format": FORMAT, "architecture": json.dumps(meta["architecture"]),
                  "classes": json.dumps(model.classes), "preprocessing": json.dumps(meta["preprocessing"])}
        save_file(state, str(out / WEIGHTS), metadata=header)
        write_meta(out, {k: v for k, v in meta.items() if k != "compression"})
        if meta.get("unknown") and (run / UNKNOWN_FILE).exists():  # the same network: its unknown score goes along
            shutil.copy2(run / UNKNOWN_FILE, out / UNKNOWN_FILE)
        info["file"] = str(out / WEIGHTS)
    info["size_bytes"] = Path(info["file"]).stat().st_size
    return info
