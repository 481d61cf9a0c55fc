"""Compress and export: smaller and faster models, each a loadable artifact, measured in one table.

``compress(run)`` writes RUN/compressed/METHOD for fp16/bf16 downcasts, int8 weights by linear quantization
(symmetric and asymmetric), ONNX, ONNX Runtime static int8 (three calibrations) and PyTorch's PT2E int8 flow,
and measures each (accuracy, size, latency, throughput, Grad-CAM agreement). ``export(run, format)`` writes
ONNX, TorchScript or safetensors for other servers. This package only writes artifacts; ``fovea.runtime``
loads every one of them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["METHODS", "SHORT_COLUMNS", "compress", "export", "table_rows"]


def __getattr__(name: str) -> Any:
    if name in ("METHODS", "compress"):
        from fovea.compress import _compress

        return getattr(_compress, name)
    if name in ("SHORT_COLUMNS", "table_rows"):  # the table's cells as text, for a terminal
        from fovea.compress import _report

        return getattr(_report, "SHORT" if name == "SHORT_COLUMNS" else name)
    if name == "export":
        from fovea.compress._export import export

        return export
    raise AttributeError(f"module 'fovea.compress' has no attribute {name!r}")
