"""Compress and export: smaller and faster models, each a loadable artifact, measured in one table.

``compress(run)`` writes RUN/compressed/METHOD for fp16/bf16 downcasts, int8 weights by linear quantization
(symmetric and asymmetric), ONNX, ONNX Runtime static int8 (three calibrations) and PyTorch's PT2E int8 flow,
and measures each (accuracy, size, latency, throughput, Grad-CAM agreement). ``export(run, format)`` writes
ONNX, TorchScript or safetensors for other servers. ``fovea.load`` opens every artifact written here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fovea.errors import FoveaError

if TYPE_CHECKING:
    from fovea.artifact import Predictor

__all__ = ["METHODS", "compress", "decode_state", "export", "load_runtime"]


def __getattr__(name: str) -> Any:
    if name in ("METHODS", "compress"):
        from fovea.compress import _compress

        return getattr(_compress, name)
    if name == "export":
        from fovea.compress._export import export

        return export
    raise AttributeError(f"module 'fovea.compress' has no attribute {name!r}")


def decode_state(state: dict[str, torch.Tensor], compression: dict[str, Any], device: torch.device,
                 where: Path) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """A compressed safetensors state back to loadable tensors, and the dtype the network should compute in.

    fp16/bf16 compute in their own dtype where the device does natively (any CUDA GPU; on a CPU, the
    AVX512/AMX instructions for it), else in float32; int8 weights are dequantized to float32.
    """
    from fovea.compress._linear import dequantize_state
    from fovea.compress._measure import hardware

    method = compression.get("method")
    if method in ("fp16", "bf16"):
        dtype = torch.float16 if method == "fp16" else torch.bfloat16
        name = "float16" if method == "fp16" else "bfloat16"
        native = device.type == "cuda" or hardware().native(name, "cpu")
        return state, dtype if native else torch.float32
    if method in ("int8-sym", "int8-asym"):
        return dequantize_state(state), torch.float32
    raise FoveaError(f"{where}: compression {method!r} is not one this Fovea knows; upgrade fovea")


def load_runtime(path: str | Path, runtime: str, device: str = "auto") -> Predictor:
    """A compressed artifact that PyTorch weights cannot hold: ONNX (ONNX Runtime) or torch.export (PT2E)."""
    if runtime == "onnxruntime":
        from fovea.compress._onnx import OnnxModel

        return OnnxModel(path, device)
    if runtime == "torch.export":
        from fovea.compress._pt2e import ExportedModel

        return ExportedModel(path, device)
    raise FoveaError(f"{path}: runtime {runtime!r} is not one this Fovea knows; upgrade fovea")
