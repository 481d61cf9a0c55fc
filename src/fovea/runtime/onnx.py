"""ONNX artifacts run by ONNX Runtime: the graph takes uint8 images (N, 3, S, S) and normalises them itself, so a
Triton or ONNX Runtime user needs no Fovea code. ``fovea.compress`` writes them; this module reads them."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fovea.artifact import ONNX_FILE
from fovea.errors import FoveaError
from fovea.runtime._predictor import Network

INPUT, OUTPUT = "images", "logits"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporters, quantizers and loaders print progress and warnings meant for their developers."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(level)


def session(path: str | Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # No spin-waiting: ONNX Runtime's threads otherwise spin after each run, and with several sessions in one
    # process (compress's table; a server holding production and candidate) the idle ones steal the cores.
    # Measured on 2 cores, 4 sessions, pets cnn int8: 4,000 -> 2,550 images/s once all had run with
    # spinning; 3,600-3,800 steady without. Costs one image's latency 0.31 -> 0.44 ms for a lone session.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # onnxruntime's own exception types (Fail, InvalidGraph, ...) are not importable
        raise FoveaError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}") from e


def run_session(sess: Any, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    x = images.cpu().numpy()
    out = [sess.run([OUTPUT], {INPUT: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return torch.from_numpy(np.concatenate(out).astype(np.float32, copy=False))


class OnnxModel(Network):
    """An ONNX artifact (model.onnx + model.json) run by ONNX Runtime."""

    def __init__(self, path: str | Path, device: str = "auto", meta: dict[str, Any] | None = None,
                 unknown: bool = True) -> None:
        super().__init__(path, device, meta, unknown)
        file = self.path / ONNX_FILE
        if not file.exists():
            raise FoveaError(f"{self.path} says its runtime is ONNX Runtime but has no {ONNX_FILE}")
        self.session = session(file)
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != [INPUT]:
            raise FoveaError(f"{file} takes inputs {inputs}; a Fovea ONNX model takes one, {INPUT!r}")
        self.load_unknown(exposes_embedding=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return run_session(self.session, images)
