"""ONNX export and ONNX Runtime static int8 quantization (``fovea.runtime.onnx`` loads what they write).

The exported graph takes what Fovea's decoder gives, uint8 images (N, 3, S, S) at the model's size, and
normalizes them itself, so a Triton or ONNX Runtime user needs no Fovea code: decode, resize the shorter
side and centre-crop to S, send the bytes. The batch dimension is dynamic. ``--preprocess`` steps (OpenCV)
are not in the graph; model.json lists them and Fovea's loader applies them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fovea.errors import FoveaError
from fovea.runtime.onnx import INPUT, OUTPUT, quiet

log = logging.getLogger("fovea.compress")
CALIBRATIONS = ("minmax", "percentile", "entropy")
# Histogram settings per calibration (ONNX Runtime's names); MinMax needs none.
CALIBRATION_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {},
    "percentile": {"num_bins": 2048, "percentile": 99.999},
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
}


class Normalized(nn.Module):
    """uint8 images in, logits out: the network with Fovea's normalization in front (for export)."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(1, -1, 1, 1))
        self.register_buffer("shift", (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std)).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() * self.scale - self.shift)


def export_onnx(net: nn.Module, mean: Sequence[float], std: Sequence[float], image_size: int, path: Path) -> Path:
    """Write ``path`` (one self-contained file, weights inside) with a dynamic batch dimension.

    The torch.export-based exporter (PyTorch's current one) with its graph optimizations; opset 18.
    """
    wrapped = Normalized(net.float().cpu().eval(), mean, std).eval()
    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with quiet(), torch.no_grad():
            torch.onnx.export(wrapped, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_shapes={"images": {0: batch}}, dynamo=True, external_data=False,
                              optimize=True, verbose=False)
    except Exception as e:  # the exporter raises many types; the user needs to know which layer failed
        raise FoveaError(f"ONNX export failed: {str(e).splitlines()[0][:400]}") from e
    return path


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over uint8 images, a few at a time."""

    def __init__(self, images: torch.Tensor, batch_size: int = 16) -> None:
        x = images.cpu().numpy()
        self._batches = iter([{INPUT: x[i : i + batch_size]} for i in range(0, len(x), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # not needed: quantize_static reads once per calibration
        pass


def count_ops(path: str | Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def quantize_ort(fp32: Path, out: Path, calibration: torch.Tensor, method: str, *, work: Path) -> dict[str, Any]:
    """Static int8 (QDQ, per-channel int8 weights, uint8 activations) calibrated on ``calibration`` images.

    BatchNorm is folded into the convs before them, so the folded weights, not the raw ones, are quantized
    (one rounding instead of two): the exporter's optimizer already folds it in eval mode, and
    ``quant_pre_process`` (ONNX Runtime's graph optimizer) would fold any left. Returns what happened: the
    BatchNormalization node counts before and after, and how many tensors are quantized.
    """
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATIONS:
        raise FoveaError(f"unknown calibration {method!r}; choose from {', '.join(CALIBRATIONS)}")
    pre = work / "preprocessed.onnx"
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    with quiet():
        if not pre.exists():
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        # The calibrator is built here rather than inside quantize_static, which cannot pass it a histogram
        # size: its entropy default (128 bins for 128 quantized bins) leaves one candidate threshold, the full
        # range, so "entropy" silently equals MinMax (byte-identical models, measured). 2048 bins is the
        # size of TensorRT's entropy calibration, which ORT's implements.
        with tempfile.TemporaryDirectory(prefix="fovea-calib-") as tmp:
            calibrator = create_calibrator(pre, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=calib, extra_options=CALIBRATION_OPTIONS[method])
            calibrator.collect_data(_Reader(calibration))
            ranges = calibrator.compute_data()
        cache = work / f"ranges-{method}.json"
        cache.unlink(missing_ok=True)
        save_tensors_data(ranges, cache)
        quantize_static(str(pre), str(out), None, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calib,
                        calibration_cache_path=str(cache))
    before, after = count_ops(fp32), count_ops(out)
    return {"calibration": method, "calibration_images": len(calibration), "format": "QDQ",
            "weights": "int8 per channel", "activations": "uint8 per tensor",
            "batchnorm_before": before.get("BatchNormalization", 0), "batchnorm_after": after.get("BatchNormalization", 0),
            "quantized_nodes": after.get("QuantizeLinear", 0)}
