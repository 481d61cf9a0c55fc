"""PyTorch's current int8 flow: PT2E (export, prepare, calibrate, convert) with the x86 Inductor quantizer.

The quantizer lives in torchao since PyTorch 2.10 deprecated ``torch.ao.quantization``. It needs the graph
from a *strict* ``torch.export`` (it finds convs by the ``source_fn_stack`` that only strict export records:
with the default non-strict export it silently quantizes nothing). The converted program is fast only once
Inductor compiles it (``torch.compile``, with freezing, fuses quantize-conv-dequantize into oneDNN int8
kernels), which takes tens of seconds on a small CPU: paid once per process.

The artifact is ``model.pt2`` (``torch.export.save``). Its loader reads tensors with ``torch.load`` when the
archive marks them as pickled, which would let a stranger's file run code; Fovea refuses such archives
(``check_archive``) and its own never contain one.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fovea.artifact import Predictor
from fovea.compress._onnx import Normalized, _quiet
from fovea.errors import FoveaError

PT2_FILE = "model.pt2"


def _batch_dim() -> Any:
    return {"images": {0: torch.export.Dim("batch", min=1, max=65536)}}


def quantize_pt2e(net: nn.Module, mean: Any, std: Any, image_size: int, calibration: torch.Tensor,
                  out: Path) -> dict[str, Any]:
    """Quantize with the x86 Inductor quantizer (int8, per-channel weights), calibrate, save ``out``."""
    try:
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:
        raise FoveaError(f"the PT2E flow needs torchao ({e}); pip install torchao") from e
    wrapped = Normalized(net.float().cpu().eval(), mean, std).eval()
    example = (calibration[:2].cpu(),)
    with _quiet(), torch.no_grad():
        graph = torch.export.export(wrapped, example, dynamic_shapes=_batch_dim(), strict=True).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)  # type: ignore[arg-type]
        for i in range(0, len(calibration), 16):
            prepared(calibration[i : i + 16].cpu())
        converted = convert_pt2e(prepared)
        move_exported_model_to_eval(converted)
        program = torch.export.export(converted, example, dynamic_shapes=_batch_dim())
        program.example_inputs = None  # else saved in the archive (pickled): dead weight, and a pickle
        torch.export.save(program, str(out))
    ops = [str(n.target) for n in converted.graph.nodes if n.op == "call_function"]
    n_quant = sum("quantize_per_tensor" in o and "dequantize" not in o for o in ops)
    if n_quant == 0:
        raise FoveaError("the x86 Inductor quantizer found nothing to quantize in this network")
    return {"quantizer": "X86InductorQuantizer (torchao)", "weights": "int8 per channel",
            "activations": "uint8 per tensor (histogram observer)", "calibration_images": len(calibration),
            "quantized_activations": n_quant, "compiled_with": "torch.compile (Inductor, freezing)"}


def check_archive(path: Path) -> None:
    """Refuse a .pt2 whose tensors would be unpickled by ``torch.export.load`` (code could run)."""
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith(("model_weights_config.json", "model_constants_config.json")):
                    config = json.loads(z.read(name)).get("config", {})
                    pickled = [k for k, v in config.items() if v.get("use_pickle")]
                    if pickled:
                        raise FoveaError(f"{path} stores tensors as pickles ({pickled[:3]}); Fovea does not load "
                                         "pickles, which can run code")
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise FoveaError(f"{path} is not a torch.export archive: {e}") from e


class ExportedModel(Predictor):
    """A PT2E int8 artifact (model.pt2 + model.json), compiled by Inductor on first use."""

    def __init__(self, path: str | Path, device: str = "auto", compile: bool = True) -> None:
        super().__init__(path, "cpu")  # the x86 quantizer's kernels are CPU kernels
        file = self.path / PT2_FILE
        if not file.exists():
            raise FoveaError(f"{self.path} says its runtime is torch.export but has no {PT2_FILE}")
        check_archive(file)
        with _quiet():
            self.module = torch.export.load(str(file)).module()
        self.runner: Any = self.module
        if compile:
            self.runner = torch.compile(self.module, dynamic=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # freezing folds weights into constants, which the int8 fusions need; set per call, not globally
        with torch.no_grad(), _quiet(), torch._inductor.config.patch(freezing=True):
            out = [self.runner(images[i : i + 256].cpu()) for i in range(0, len(images), 256)]
        return torch.cat(out).float()
