"""torch.export artifacts (``model.pt2``): the PT2E int8 program ``fovea compress`` writes, compiled by Inductor
on first use. Its loader reads tensors with ``torch.load`` when the archive marks them as pickled, which would
let a stranger's file run code; Fovea refuses such archives (``check_archive``) and its own never contain one."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from fovea.artifact import PT2_FILE
from fovea.errors import FoveaError
from fovea.runtime._predictor import Network
from fovea.runtime.onnx import quiet


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


class ExportedModel(Network):
    """A PT2E int8 artifact (model.pt2 + model.json), compiled by Inductor on first use."""

    def __init__(self, path: str | Path, device: str = "auto", meta: dict[str, Any] | None = None,
                 unknown: bool = True, compile: bool = True) -> None:
        super().__init__(path, "cpu", meta, unknown)  # the x86 quantizer's kernels are CPU kernels
        file = self.path / PT2_FILE
        if not file.exists():
            raise FoveaError(f"{self.path} says its runtime is torch.export but has no {PT2_FILE}")
        check_archive(file)
        with quiet():
            self.module = torch.export.load(str(file)).module()
        self.runner: Any = self.module
        if compile:
            self.runner = torch.compile(self.module, dynamic=True)
        self.load_unknown(exposes_embedding=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # freezing folds weights into constants, which the int8 fusions need; set per call, not globally
        with torch.no_grad(), quiet(), torch._inductor.config.patch(freezing=True):
            out = [self.runner(images[i : i + 256].cpu()) for i in range(0, len(images), 256)]
        return torch.cat(out).float()
