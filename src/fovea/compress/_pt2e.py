"""PyTorch's current int8 flow: PT2E (export, prepare, calibrate, convert) with the x86 Inductor quantizer.

The quantizer lives in torchao since PyTorch 2.10 deprecated ``torch.ao.quantization``. It needs the graph
from a *strict* ``torch.export`` (it finds convs by the ``source_fn_stack`` that only strict export records:
with the default non-strict export it silently quantizes nothing). The converted program is fast only once
Inductor compiles it (``torch.compile``, with freezing, fuses quantize-conv-dequantize into oneDNN int8
kernels), which takes tens of seconds on a small CPU: paid once per process.

The artifact is ``model.pt2`` (``torch.export.save``), loaded by ``fovea.runtime.exported``, which refuses
archives with pickled tensors; the program saved here never holds one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fovea.compress._onnx import Normalized
from fovea.errors import FoveaError
from fovea.runtime.onnx import quiet


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
    with quiet(), torch.no_grad():
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
