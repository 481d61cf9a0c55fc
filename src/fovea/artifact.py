"""The model artifact's format: the one thing that crosses from training to everything after it.

A folder with ``model.json`` (architecture, classes, preprocessing, training config, metrics, data fingerprint,
library versions) and the network's file: ``model.safetensors`` (PyTorch weights, also fp16/bf16/int8),
``model.onnx`` (ONNX Runtime) or ``model.pt2`` (torch.export); an ensemble holds no network of its own but its
``members/`` folders. ``reference.npz`` (the drift reference) and ``report.html`` travel with it. Anything
downstream - evaluate, predict, compress, serve, monitor - rebuilds the model and its exact preprocessing from
these files alone (``fovea.runtime.load``). No pickle: a model folder from a stranger cannot run code when loaded.

This module is the format only - file names, reading and checking ``model.json``, writing it - so every layer
can name the files without importing a network runtime.
"""

from __future__ import annotations

import contextlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from fovea.errors import FoveaError

FORMAT = "fovea.model"
FORMAT_VERSION = 1
META = "model.json"
WEIGHTS = "model.safetensors"
ONNX_FILE = "model.onnx"
PT2_FILE = "model.pt2"
REFERENCE = "reference.npz"  # what validation looked like to the model (fovea.monitor)
REPORT = "report.html"
UNKNOWN_FILE = "unknown.safetensors"  # the fitted unknown-image score (fovea.runtime.unknown)
MEMBERS = "members"  # an ensemble's copies of its members
# What a registered version copies: the artifact's own files, not checkpoints or compressed siblings.
FILES = (META, WEIGHTS, ONNX_FILE, PT2_FILE, REFERENCE, REPORT, UNKNOWN_FILE)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("fovea", "torch", "torchvision", "timm", "safetensors", "numpy", "pillow"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def write_meta(folder: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``folder/model.json``: ``meta`` stamped with the format, its version, the time and the libraries.

    The one writer of model.json (training, ensembles, compression and export all call it), so every artifact
    names its format the same way. ``meta`` needs architecture (except an ensemble), classes and preprocessing.
    """
    for key in ("classes", "preprocessing"):
        if key not in meta:
            raise ValueError(f"model metadata needs {key!r}")
    plain = {k: v for k, v in meta.items() if k not in ("format", "format_version", "created", "versions")}
    full = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(), **plain}
    path = Path(folder) / META
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(full, indent=2, default=str))
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """model.json of a model folder (or the file itself), checked: FoveaError with the reason when it is not one."""
    path = Path(path)
    meta_file = path / META if path.is_dir() else path
    if not meta_file.exists():
        raise FoveaError(f"{path} is not a Fovea model: no {META} (a model folder holds {WEIGHTS} + {META})")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise FoveaError(f"{meta_file} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FoveaError(f"{meta_file} is not a Fovea model description (format is not {FORMAT!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise FoveaError(f"{meta_file} was written by a newer Fovea (format {meta['format_version']}); upgrade fovea")
    _check_meta(meta, meta_file)
    return meta


def training_data(meta: dict[str, Any], hint: str) -> Path:
    """The training data ``model.json`` names, when it is on this machine; else FoveaError ending with ``hint``
    (what the caller's user can do instead)."""
    recorded = (meta.get("data") or {}).get("root")
    if not recorded:
        raise FoveaError(f"its model.json names no training data (an ensemble of models trained on different data, "
                         f"or an older artifact); {hint}")
    root = Path(recorded)
    if not root.exists():
        raise FoveaError(f"the model's training data {root} is not here (not at that path any more: moved, or "
                         f"trained on another machine); {hint}")
    return root


def runtime_of(meta: dict[str, Any]) -> str:
    """What runs the artifact: "torch", "onnxruntime", "torch.export" or "ensemble"."""
    if "ensemble" in meta:
        return "ensemble"
    return str((meta.get("compression") or {}).get("runtime", "torch"))


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _check_meta(meta: dict[str, Any], where: Path) -> None:
    """The fields every loader relies on, with what they must hold: an edited or foreign model.json fails here
    with its reason, not later as a KeyError or a NaN prediction."""
    def bad(what: str) -> NoReturn:
        raise FoveaError(f"{where}: {what} (was this model.json edited, or written by another tool?)")

    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        bad("'classes' must list two or more class names")
    elif len(set(classes)) != len(classes):
        bad("'classes' names a class twice")
    pre = meta.get("preprocessing")
    if not isinstance(pre, dict):
        bad("no 'preprocessing' object")
    size = pre.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 8192:
        bad(f"preprocessing.image_size must be a whole number of pixels, got {size!r}")
    if "ensemble" in meta:
        return
    for k in ("mean", "std"):
        v = pre.get(k)
        if not isinstance(v, list) or len(v) != 3 or not all(_number(x) for x in v):
            bad(f"preprocessing.{k} must be three numbers (R, G, B), got {v!r}")
    if any(x <= 0 for x in pre["std"]):
        bad(f"preprocessing.std must be positive, got {pre['std']}")
    arch = meta.get("architecture")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) or not isinstance(arch.get("kwargs", {}), dict):
        bad("'architecture' must be an object with a 'name' and its 'kwargs'")
