"""What every loaded artifact shares: its classes, its input size, decoding, ``predict``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fovea.artifact import META, read_meta
from fovea.errors import FoveaError, ImageError


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
    """A loaded artifact: ``fovea.load(run).predict(paths)``, ``predict_proba(images)``, ``load_images(files)``.

    Subclasses compute probabilities: ``Network`` (one network: PyTorch, ONNX Runtime or torch.export) and
    ``Ensemble`` (several). Everything else - decoding at the model's size, turning probabilities into
    labels - is here, once.
    """

    def __init__(self, path: str | Path, device: str = "auto", meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.meta = meta if meta is not None else read_meta(self.path)
        self.device = pick_device(device)
        self.classes: list[str] = list(self.meta["classes"])
        self.image_size = int(self.meta["preprocessing"]["image_size"])

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 scores (N, C) whose softmax is ``predict_proba``, for uint8 (N, 3, S, S) images at ``image_size``."""
        raise NotImplementedError

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        """Probabilities (N, classes) for uint8 (N, 3, S, S) images at ``image_size`` (``load_images``' output)."""
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return self.logits(images).softmax(1).numpy()

    def predict_proba_embed(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and the penultimate-layer embedding (N, D), for drift monitoring; None where the runtime
        does not expose it (ONNX Runtime, torch.export, an ensemble)."""
        return self.predict_proba(images), None

    def load_images(self, sources: Iterable[str | Path | bytes]) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
        """Decode and resize with this model's preprocessing; returns (images, kept indexes, (index, reason)).

        --preprocess steps are not applied here but by the model itself (``Network.prepare``), like every
        decoder's output.
        """
        from fovea.data import load_square

        arrays, kept, bad = [], [], []
        for i, src in enumerate(sources):
            try:
                arrays.append(load_square(src, self.image_size))
                kept.append(i)
            except ImageError as e:
                bad.append((i, e.reason))
        s = self.image_size
        x = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy()) if arrays else torch.zeros(0, 3, s, s, dtype=torch.uint8)
        return x, kept, bad

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


class Network(Predictor):
    """One network: its normalisation, --preprocess steps and test-time augmentation, around ``forward``.

    Subclasses run the network: ``TorchModel`` (PyTorch weights, including fp16/bf16 and int8-weight artifacts),
    ``OnnxModel`` (ONNX Runtime) and ``ExportedModel`` (torch.export). They implement ``forward``.
    """

    def __init__(self, path: str | Path, device: str = "auto", meta: dict[str, Any] | None = None) -> None:
        super().__init__(path, device, meta)
        pre = self.meta["preprocessing"]
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
