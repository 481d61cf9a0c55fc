"""The model artifact: the one thing that crosses from training to everything after it.

A folder with ``model.safetensors`` (weights) and ``model.json`` (architecture, classes, preprocessing,
training config, metrics, data fingerprint, library versions). Anything downstream - evaluate,
predict, compress, serve - rebuilds the model and its exact preprocessing from these two files.
No pickle: a model folder from a stranger cannot execute code when loaded.
"""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch
from torch import nn

from fovea.errors import FoveaError, ImageError

if TYPE_CHECKING:
    from fovea.ensemble import Ensemble

FORMAT = "fovea.model"
FORMAT_VERSION = 1
WEIGHTS, META = "model.safetensors", "model.json"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("fovea", "torch", "torchvision", "timm", "safetensors", "numpy", "pillow"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA or CPU when enabled, else a no-op: one code path for both (nanoGPT)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def infer(
    net: nn.Module,
    images: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    amp: bool = False,
    tta: bool = False,
    batch_size: int = 256,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Logits (N, C) float32 on CPU for uint8 images (N, 3, S, S); ``tta`` averages with the mirror image.

    ``dtype`` is the network's own (an fp16/bf16 artifact's); the input is cast to it, without autocast.
    """
    from fovea.data._loader import _affine_norm, normalize

    was_training = net.training
    net.eval()
    out = []
    coef = _affine_norm(tuple(mean), tuple(std), device)
    for i in range(0, len(images), batch_size):
        x = normalize(images[i : i + batch_size].to(device, non_blocking=True), tuple(mean), tuple(std), coef)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.to(dtype)
        with autocast(device, amp):
            logits = net(x).float()
            if tta:
                logits = (logits.log_softmax(1) + net(x.flip(3)).float().log_softmax(1)) / 2
        out.append(logits)
    net.train(was_training)
    return torch.cat(out).cpu() if out else torch.zeros(0, 0)


def save_artifact(out: str | Path, net: nn.Module, meta: dict[str, Any]) -> Path:
    """Write weights + model.json into ``out``. ``meta`` needs architecture, classes, preprocessing."""
    from safetensors.torch import save_file

    for key in ("architecture", "classes", "preprocessing"):
        if key not in meta:
            raise ValueError(f"model metadata needs {key!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    full = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), **meta,
    }
    (out / META).write_text(json.dumps(full, indent=2, default=str))
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
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


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FoveaError("--device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(name)


@dataclass
class Prediction:
    path: str
    label: str
    probability: float
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "label": self.label, "probability": self.probability,
                "probabilities": self.probabilities}


class Predictor:
    """What every loaded artifact shares: classes, input size, --preprocess steps, TTA, decoding, predict.

    Subclasses run the network: ``Model`` (PyTorch weights, including fp16/bf16 and int8-weight artifacts),
    and in ``fovea.compress`` the ONNX Runtime and torch.export artifacts. They implement ``forward``.
    """

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.device = pick_device(device)
        self.classes: list[str] = list(self.meta["classes"])
        pre = self.meta["preprocessing"]
        self.image_size = int(pre["image_size"])
        self.mean, self.std = tuple(pre["mean"]), tuple(pre["std"])
        self.tta = bool(pre.get("tta", False))
        self.steps = _read_steps(self.path, pre.get("steps"))  # fovea.ops steps; none in older artifacts

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 logits (N, C) on the CPU for uint8 (N, 3, S, S) images: the network alone (no steps, no TTA)."""
        raise NotImplementedError

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """This model's --preprocess steps on uint8 (N, 3, S, S) images decoded at its size (a no-op without).

        Applied here, inside the model, and not when decoding: evaluate, ensembles and serving decode images
        themselves and hand them to ``logits``/``predict_proba``, so every path gets the steps exactly once,
        on the same resized pixels training applied them to. Code that feeds ``net`` directly calls this.
        """
        if not self.steps or len(images) == 0:
            return images
        from fovea.ops import preprocess

        arrays = images.permute(0, 2, 3, 1).cpu().numpy()  # (N, S, S, 3)
        out = np.stack([preprocess(a, self.steps) for a in arrays])
        return torch.from_numpy(out.transpose(0, 3, 1, 2).copy()).to(images.device)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for uint8 (N, 3, S, S) images already at this model's size (the model applies its steps).

        With test-time augmentation recorded in the artifact, the mean of the log-probabilities of the image
        and its mirror (the same as training's final evaluation).
        """
        x = self.prepare(images)
        if not self.tta:
            return self.forward(x)
        # the image and its mirror in one pass: one image's latency 4.1 -> 2.9 ms (pets cnn, 2-core CPU)
        both = self.forward(torch.cat([x, x.flip(3)])).log_softmax(1)
        return (both[: len(x)] + both[len(x) :]) / 2

    def load_images(self, sources: Iterable[str | Path | bytes]) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
        """Decode and resize with this model's preprocessing; returns (images, kept indexes, (index, reason)).

        Its --preprocess steps are not applied here but by ``logits`` (see ``prepare``), like every decoder's output.
        """
        from fovea.data import load_square

        arrays, kept, bad = [], [], []
        for i, src in enumerate(sources):
            try:
                arrays.append(load_square(src, self.image_size))
                kept.append(i)
            except ImageError as e:
                bad.append((i, e.reason))
        x = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy()) if arrays else torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return x, kept, bad

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return self.logits(images).softmax(1).numpy()

    def predict_proba_embed(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and the penultimate-layer embedding (N, D), for drift monitoring; None where the runtime
        does not expose it (ONNX Runtime, torch.export)."""
        return self.predict_proba(images), None

    def predict(self, paths: Sequence[str | Path]) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Predict files; returns (predictions, [(path, reason)] for files that could not be read)."""
        x, kept, bad = self.load_images(paths)
        probs = self.predict_proba(x)
        preds = []
        for i, p in zip(kept, probs):
            j = int(p.argmax())
            preds.append(Prediction(str(paths[i]), self.classes[j], float(p[j]),
                                    {c: float(v) for c, v in zip(self.classes, p)}))
        return preds, [(str(paths[i]), r) for i, r in bad]


class Model(Predictor):
    """A loaded model artifact with PyTorch weights: ``fovea.load(run).predict(images)``.

    Compressed weight files load here too (``fovea compress``): fp16/bf16 weights run in their own dtype where
    the hardware does it natively (any CUDA GPU; a CPU with AVX512-BF16/AMX for bf16, AVX512-FP16/AMX-FP16 for
    fp16) and in float32 elsewhere; int8 weights are dequantized to float32 once, at load.
    """

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from fovea.models import create_model

        super().__init__(path, device)
        arch = self.meta["architecture"]
        self.net = create_model(arch["name"], len(self.classes), image_size=self.image_size, **arch.get("kwargs", {}))
        try:
            state = load_file(str(self.path / WEIGHTS))
        except (OSError, SafetensorError) as e:
            raise FoveaError(f"cannot read weights {self.path / WEIGHTS}: {e}") from e
        self.dtype = torch.float32  # the dtype the network computes in
        compression = self.meta.get("compression")
        if compression:
            from fovea.compress import decode_state

            state, self.dtype = decode_state(state, compression, self.device, where=self.path / WEIGHTS)
        expected = self.net.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
        if missing or unexpected or wrong:
            raise FoveaError(
                f"{self.path / WEIGHTS} does not match architecture {arch['name']} with {len(self.classes)} classes: "
                f"{len(missing)} missing tensors (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]})"
            )
        self.net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        self.net.to(self.device, self.dtype).eval()
        self.amp = self.device.type == "cuda" and self.dtype == torch.float32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return infer(self.net, images, mean=self.mean, std=self.std, device=self.device, amp=self.amp, dtype=self.dtype)

    def _classifier(self) -> nn.Module | None:
        getter = getattr(self.net, "get_classifier", None)
        head = getter() if callable(getter) else None
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
        linears = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else None

    def predict_proba_embed(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and the classifier's input (the penultimate layer, timm's ``pre_logits``) in one pass."""
        head = self._classifier()
        if head is None or len(images) == 0:
            return self.predict_proba(images), None
        seen: list[torch.Tensor] = []

        def grab(module: nn.Module, args: Any, out: Any) -> None:
            seen.append(args[0].detach().float().reshape(len(args[0]), -1).cpu())

        handle = head.register_forward_hook(grab)
        try:
            probs = self.predict_proba(images)
        finally:
            handle.remove()
        # with TTA the network saw the images, then their mirrors: the first N rows are the images themselves
        return probs, torch.cat(seen)[: len(images)].numpy()


def _read_steps(path: Path, spec: Any) -> list[Any]:
    """model.json's preprocessing steps as fovea.ops.Step objects; OpenCV is imported only when there are some."""
    if not spec:
        return []
    from fovea.ops import parse_steps

    try:
        return parse_steps(spec)
    except (FoveaError, TypeError, AttributeError) as e:
        raise FoveaError(f"{path / META}: preprocessing steps {spec!r} cannot be applied ({e}); "
                         "a newer Fovea may have written them: upgrade fovea") from e


def load_single(path: str | Path, device: str = "auto") -> Predictor:
    """``load`` for code that needs one network (an ensemble is refused with a clear error)."""
    model = load(path, device)
    if not isinstance(model, Predictor):
        raise FoveaError(f"{path} is an ensemble of several models; give one model (its members are in {path}/members)")
    return model


def load(path: str | Path, device: str = "auto") -> Predictor | Ensemble:
    """Load a model artifact (a run folder or any folder with model.safetensors + model.json).

    A folder whose model.json has an "ensemble" entry holds no weights of its own: it loads as an
    ``Ensemble`` of the model folders it lists, with the same interface as ``Model``. A compressed artifact
    (``fovea compress``) loads by the runtime its model.json names: PyTorch weights (fp16, bf16, int8 weights)
    as a ``Model``, an ONNX file in ONNX Runtime, a torch.export program in PyTorch.
    """
    meta = read_meta(path)
    if "ensemble" in meta:
        from fovea.ensemble import Ensemble

        return Ensemble(path, device)
    runtime = (meta.get("compression") or {}).get("runtime", "torch")
    if runtime != "torch":
        from fovea.compress import load_runtime

        return load_runtime(path, runtime, device)
    return Model(path, device)
