"""Does a compressed model still look at the same pixels? Grad-CAM maps of the float32 model and of each artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fovea.artifact import ONNX_FILE
from fovea.errors import FoveaError
from fovea.runtime import Network, OnnxModel, TorchModel

# A compressed model whose Grad-CAM maps correlate less than this with the float32 model's (median Spearman
# over the images) is flagged as looking at different things. Measured on pets: int8 weights and bf16 sit
# above 0.95; a network with its last stage randomized below 0.3.
GRADCAM_FLAG = 0.7


class GradCamCheck:
    """The float32 model's Grad-CAM maps on a few test images, and each compressed artifact's for comparison.

    PyTorch artifacts get Grad-CAM with gradients (fp16/bf16 computed in float32 from the rounded weights;
    int8 weights dequantized). ONNX Runtime has no backward pass, so ONNX artifacts get it by central finite
    differences through the graph after the layer (``_ort_cam``; the same maps as PyTorch's on the float32
    export, median Spearman >= 0.999 on pets). The compiled PT2E program gets none, and its row says so.
    Each map explains the class the float32 model predicts, so two maps always answer the same question.
    """

    def __init__(self, base: TorchModel, images: torch.Tensor) -> None:
        from fovea.compress._ort_cam import layer_aliases
        from fovea.explain import net_maps, resolve_layer

        self.base, self.images = base, images
        self.layer_name, layer = resolve_layer(base.net, base.image_size, None)
        self.aliases = layer_aliases(base.net, base.image_size, self.layer_name)
        self.targets = [int(i) for i in base.predict_proba(images).argmax(1)] if len(images) else []
        self.prepared = base.prepare(images)
        self.reference: Path | None = None  # the float32 ONNX export the int8 graphs came from
        self.maps: dict[str, np.ndarray] = {}
        self.maps["fp32"] = net_maps(base.net, self.prepared, self.targets, layer=layer, **self._kw())

    def _kw(self) -> dict[str, Any]:
        return {"method": "gradcam", "mean": self.base.mean, "std": self.base.std, "batch_size": 16}

    def compare(self, method: str, other: Network) -> tuple[float | None, str]:
        """Median |Spearman| between the float32 model's maps and ``other``'s (None, why: not computable)."""
        import copy

        from fovea.compress._ort_cam import onnx_gradcam
        from fovea.explain import net_maps, rank_correlation

        if isinstance(other, TorchModel):
            net = copy.deepcopy(other.net).float().cpu()
            maps = net_maps(net, self.prepared, self.targets, layer=dict(net.named_modules())[self.layer_name],
                             **self._kw())
        elif isinstance(other, OnnxModel):
            try:
                maps = onnx_gradcam(other.path / ONNX_FILE, self.aliases, self.prepared, self.targets,
                                    reference=self.reference)
            except FoveaError as e:
                return None, f"not computed: {e}"
        else:
            return None, "not computed: no gradients in this runtime"
        self.maps[method] = maps
        return float(np.median([rank_correlation(a, b) for a, b in zip(self.maps["fp32"], maps)])), ""
