"""What every loaded artifact shares: its classes, its input size, decoding, ``predict``, and answering
``unknown`` for an image of none of its classes."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fovea.artifact import META, read_meta
from fovea.errors import FoveaError, ImageError

if TYPE_CHECKING:
    from fovea.data import ImageSet

log = logging.getLogger("fovea.runtime")
UNKNOWN = "unknown"  # the answer for an image of none of the model's classes
# Whole-set passes (evaluation, fitting the unknown score) run over blocks of at most this many bytes of pixels: the
# image and its mirror are concatenated per block, so memory stays flat for a set of any size (a disk-backed one).
BLOCK_BYTES = 256 << 20


def _block_rows(images: torch.Tensor) -> int:
    return max(1, BLOCK_BYTES // max(1, images[0].numel() * images.element_size())) if len(images) else 1


def blocks(images: torch.Tensor) -> list[torch.Tensor]:
    """``images`` (N, 3, S, S) cut into consecutive blocks of at most BLOCK_BYTES (one block when small)."""
    rows = _block_rows(images)
    return [images[i : i + rows] for i in range(0, len(images), rows)] or [images]


def set_blocks(images: torch.Tensor | ImageSet) -> Iterator[torch.Tensor]:
    """The blocks of ``blocks``, one at a time; a disk-backed ``ImageSet``'s read from its cache file as each is
    reached (``ImageSet.rows``: not through the map), so a whole-set pass holds one block of pixels however large
    the set. The same cuts as ``blocks``: a set in memory gives the same blocks, and so the same numbers."""
    if isinstance(images, torch.Tensor):
        yield from blocks(images)
        return
    rows = _block_rows(images.images)
    for lo in range(0, max(1, len(images.images)), rows):
        yield images.rows(lo, lo + rows)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FoveaError("--device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(name)


@dataclass
class Prediction:
    """One image's answer: a class, or ``unknown`` when its unknown score is over the model's threshold."""

    path: str
    label: str  # a class, or "unknown"
    probability: float  # the top class's probability
    probabilities: dict[str, float]
    unknown_score: float | None = None  # None: the model has no unknown score (an older artifact, or turned off)
    unknown_threshold: float | None = None
    class_otherwise: str | None = None  # the top class, which the answer is unless the image is unknown

    @property
    def unknown(self) -> bool:
        return self.unknown_score is not None and self.label == UNKNOWN

    def to_dict(self) -> dict[str, Any]:
        out = {"path": self.path, "label": self.label, "probability": self.probability,
               "probabilities": self.probabilities}
        if self.unknown_score is not None:
            out.update(unknown=self.unknown, unknown_score=self.unknown_score, unknown_threshold=self.unknown_threshold,
                       class_otherwise=self.class_otherwise)
        return out


@dataclass
class Outputs:
    """What one pass over images gives: probabilities, and where asked and available the penultimate embedding
    (for drift monitoring) and the unknown score."""

    probabilities: np.ndarray  # (N, C)
    embeddings: np.ndarray | None = None  # (N, D): each image's own (not averaged with its mirror)
    unknown_scores: np.ndarray | None = None  # (N,): higher means more likely none of the classes

    @staticmethod
    def concat(parts: Sequence[Outputs]) -> Outputs:
        """The outputs of consecutive blocks of images as one (the part itself when there is one)."""
        if len(parts) == 1:
            return parts[0]
        embs = [p.embeddings for p in parts if p.embeddings is not None]
        scores = [p.unknown_scores for p in parts if p.unknown_scores is not None]
        return Outputs(np.concatenate([p.probabilities for p in parts]), np.concatenate(embs) if embs else None,
                       np.concatenate(scores) if scores else None)

    def answers(self, classes: list[str], threshold: float | None) -> list[tuple[str, float, str, bool]]:
        """(label, top probability, top class, unknown) per image."""
        out = []
        for i, p in enumerate(self.probabilities):
            j = int(p.argmax())
            unknown = self.unknown_scores is not None and threshold is not None and self.unknown_scores[i] > threshold
            out.append((UNKNOWN if unknown else classes[j], float(p[j]), classes[j], bool(unknown)))
        return out


class Predictor:
    """A loaded artifact: ``fovea.load(run).predict(paths)``, ``predict_proba(images)``, ``load_images(files)``.

    Subclasses compute probabilities: ``Network`` (one network: PyTorch, ONNX Runtime or torch.export) and
    ``Ensemble`` (several). Everything else - decoding at the model's size, turning probabilities into
    labels, answering ``unknown`` - is here, once. ``unknown=False`` loads the model closed-set even when it
    carries an unknown score (``--no-unknown``).
    """

    def __init__(self, path: str | Path, device: str = "auto", meta: dict[str, Any] | None = None,
                 unknown: bool = True) -> None:
        self.path = Path(path)
        self.meta = meta if meta is not None else read_meta(self.path)
        self.device = pick_device(device)
        self.classes: list[str] = list(self.meta["classes"])
        self.image_size = int(self.meta["preprocessing"]["image_size"])
        self.open_set = unknown  # subclasses load their score when this is on and the artifact has one
        self.unknown_threshold: float | None = None  # set when the model answers "unknown"

    @property
    def answers_unknown(self) -> bool:
        """Whether this model answers ``unknown`` (its artifact has a calibrated score and it is not turned off)."""
        return self.unknown_threshold is not None

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 scores (N, C) whose softmax is ``predict_proba``, for uint8 (N, 3, S, S) images at ``image_size``."""
        raise NotImplementedError

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        """Probabilities (N, classes) for uint8 (N, 3, S, S) images at ``image_size`` (``load_images``' output)."""
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return self.logits(images).softmax(1).numpy()

    def outputs(self, images: torch.Tensor, *, embed: bool = False) -> Outputs:
        """Probabilities, the embedding when ``embed`` (where the runtime exposes one) and the unknown score
        (when the model has one) of uint8 (N, 3, S, S) images, in one pass where the runtime allows."""
        return Outputs(self.predict_proba(images))

    def outputs_over(self, images: torch.Tensor | ImageSet, *, embed: bool = False) -> Outputs:
        """``outputs`` of a whole set, a block at a time (``set_blocks``): a disk-backed ``ImageSet`` is read from its
        cache file block by block, so memory holds one block of pixels (BLOCK_BYTES) besides the outputs."""
        return Outputs.concat([self.outputs(b, embed=embed) for b in set_blocks(images)])

    def predict_proba_embed(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and the penultimate-layer embedding (N, D), for drift monitoring; None where the runtime
        does not expose it (ONNX Runtime, torch.export, an ensemble)."""
        o = self.outputs(images, embed=True)
        return o.probabilities, o.embeddings

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

    def predictions(self, names: Sequence[str], out: Outputs) -> list[Prediction]:
        """``out`` as one ``Prediction`` per image, named ``names``."""
        preds = []
        for k, (label, top, top_class, _) in enumerate(out.answers(self.classes, self.unknown_threshold)):
            p = out.probabilities[k]
            score = None if out.unknown_scores is None or self.unknown_threshold is None else float(out.unknown_scores[k])
            preds.append(Prediction(names[k], label, top, {c: float(v) for c, v in zip(self.classes, p)}, score,
                                    self.unknown_threshold if score is not None else None,
                                    top_class if score is not None else None))
        return preds

    def predict(self, paths: Sequence[str | Path]) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Predict files; returns (predictions, [(path, reason)] for files that could not be read)."""
        x, kept, bad = self.load_images(paths)
        preds = self.predictions([str(paths[i]) for i in kept], self.outputs(x))
        return preds, [(str(paths[i]), r) for i, r in bad]


class Network(Predictor):
    """One network: its normalisation, --preprocess steps, test-time augmentation and unknown score, around
    ``forward``.

    Subclasses run the network: ``TorchModel`` (PyTorch weights, including fp16/bf16 and int8-weight artifacts),
    ``OnnxModel`` (ONNX Runtime) and ``ExportedModel`` (torch.export). They implement ``forward``, and
    ``_views`` where they expose an embedding.
    """

    def __init__(self, path: str | Path, device: str = "auto", meta: dict[str, Any] | None = None,
                 unknown: bool = True) -> None:
        super().__init__(path, device, meta, unknown)
        pre = self.meta["preprocessing"]
        self.mean, self.std = tuple(pre["mean"]), tuple(pre["std"])
        self.tta = bool(pre.get("tta", False))
        self.steps = _read_steps(self.path, pre.get("steps"))  # fovea.ops steps; none in older artifacts
        self.score: Any = None  # fovea.runtime.unknown.Score, fitted at training
        self.score_tta = False  # the score reads features averaged with the mirror image's

    def load_unknown(self, exposes_embedding: bool) -> None:
        """The artifact's unknown score and threshold, when it has them and they are wanted; a score that needs
        an embedding this runtime does not expose is left off, with a warning."""
        entry = self.meta.get("unknown")
        if not self.open_set or not entry:
            return
        from fovea.runtime.unknown import SCORES, UNKNOWN_FILE, load_unknown

        file = entry.get("file", UNKNOWN_FILE) if isinstance(entry, dict) else UNKNOWN_FILE
        if isinstance(file, str) and not (self.path / file).exists() and getattr(SCORES.get(entry.get("score")),
                                                                                 "uses_embedding", False):
            # model.json copied without the score's file (by hand, or by an older tool): still a good model
            log.warning("%s: model.json names an unknown score but %s is missing; answering closed-set "
                        "(fovea calibrate-unknown gives it one again)", self.path, file)
            return
        score, threshold = load_unknown(self.path, entry)
        if score.uses_embedding and not exposes_embedding:
            log.warning("%s: its unknown score %s needs the embedding, which this runtime does not expose; "
                        "answering closed-set", self.path, score.name)
            return
        self.score, self.unknown_threshold = score, float(threshold)
        self.score_tta = bool(entry.get("tta", False))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 logits (N, C) on the CPU for uint8 (N, 3, S, S) images: the network alone (no steps, no TTA)."""
        raise NotImplementedError

    def _views(self, x: torch.Tensor, views: int, embed: bool,
               stages: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Raw logits (V, N, C), embeddings (V, N, D) and per-stage activation statistics (V, N, F) (None: not
        asked for, or not exposed by this runtime) of prepared images and, with ``views`` 2, their mirrors."""
        batch = torch.cat([x, x.flip(3)]) if views == 2 else x
        return self.forward(batch).float().reshape(views, len(x), -1), None, None

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

    def features(self, images: torch.Tensor, tta: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw logits (N, C) and the penultimate-layer embedding (N, D) (None where the runtime exposes none) of
        uint8 (N, 3, S, S) images at this model's size, after its steps: what an unknown-image score reads.

        ``tta`` (default: the artifact's own) averages each with the mirror image's. Raw logits, not the
        log-probabilities ``logits`` returns with TTA: energy-style scores need their scale.
        """
        f = self.score_inputs(images, tta=tta, score=None)
        return f["logits"], f["embeddings"]

    def score_inputs(self, images: torch.Tensor, *, tta: bool | None = None, score: Any = None) -> dict[str, Any]:
        """Everything an unknown score may read, for uint8 (N, 3, S, S) images: "logits" (N, C), "embeddings"
        (N, D) or None, and where ``score`` asks for them, "images" (the prepared uint8 pixels (N, 3, S, S), the
        image itself not its mirror) and "stages" (per-channel mean and spread of each feature stage, (N, F),
        None where the runtime exposes none). Views are averaged over the mirror with ``tta``."""
        parts = blocks(images)
        if len(parts) > 1:
            return _concat_inputs([self.score_inputs(b, tta=tta, score=score) for b in parts])
        tta = self.tta if tta is None else tta
        x = self.prepare(images)
        want_stages = bool(getattr(score, "uses_stages", False))
        logits, emb, stages = self._views(x, 2 if tta else 1, embed=True, stages=want_stages)
        out: dict[str, Any] = {"logits": logits.mean(0).numpy(),
                               "embeddings": None if emb is None else emb.mean(0).numpy()}
        if getattr(score, "uses_images", False):
            out["images"] = x.cpu().numpy()
        if want_stages:
            out["stages"] = None if stages is None else stages.mean(0).numpy()
        return out

    def score_inputs_over(self, images: torch.Tensor | ImageSet, *, tta: bool | None = None,
                          score: Any = None) -> dict[str, Any]:
        """``score_inputs`` of a whole set, a block at a time (``set_blocks``; a disk-backed set read block by block)."""
        return _concat_inputs([self.score_inputs(b, tta=tta, score=score) for b in set_blocks(images)])

    def _score(self, x: torch.Tensor, logits: torch.Tensor, emb: torch.Tensor | None,
               stages: torch.Tensor | None) -> np.ndarray:
        """The unknown score of prepared images ``x`` from one pass's views (averaged as the score was fitted)."""
        def pick(t: torch.Tensor) -> np.ndarray:
            return (t.mean(0) if self.score_tta else t[0]).numpy()

        extra: dict[str, Any] = {}
        if getattr(self.score, "uses_images", False):
            extra["images"] = x.cpu().numpy()
        if getattr(self.score, "uses_stages", False):
            extra["stages"] = None if stages is None else pick(stages)
        return np.asarray(self.score(embeddings=None if emb is None else pick(emb), logits=pick(logits), **extra),
                          np.float64)

    def outputs(self, images: torch.Tensor, *, embed: bool = False) -> Outputs:
        """One pass (the image, and its mirror where TTA or the score asks) gives the probabilities (as
        ``predict_proba``: the softmax of the mean logits equals the mean log-probabilities'), the image's own
        embedding and the unknown score."""
        c = len(self.classes)
        if len(images) == 0:
            return Outputs(np.zeros((0, c), np.float32), np.zeros((0, 0), np.float32) if embed else None,
                           np.zeros(0) if self.score is not None else None)
        parts = blocks(images)
        if len(parts) > 1:
            return Outputs.concat([self.outputs(b, embed=embed) for b in parts])
        scored = self.score is not None
        if not scored and not embed:
            return Outputs(self.predict_proba(images))
        views = 2 if (self.tta or (scored and self.score_tta)) else 1
        x = self.prepare(images)
        logits, emb, stages = self._views(x, views, embed or (scored and self.score.uses_embedding),
                                          stages=scored and bool(getattr(self.score, "uses_stages", False)))
        probs = (logits.mean(0) if self.tta else logits[0]).softmax(1).numpy()
        scores = self._score(x, logits, emb, stages) if scored else None
        return Outputs(probs, None if (emb is None or not embed) else emb[0].numpy(), scores)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for uint8 (N, 3, S, S) images already at this model's size (the model applies its steps).

        With test-time augmentation recorded in the artifact, the mean of the log-probabilities of the image
        and its mirror (the same as training's final evaluation).
        """
        parts = blocks(images)
        if len(parts) > 1:
            return torch.cat([self.logits(b) for b in parts])
        x = self.prepare(images)
        if not self.tta:
            return self.forward(x)
        # the image and its mirror in one pass: one image's latency 4.1 -> 2.9 ms (pets cnn, 2-core CPU)
        both = self.forward(torch.cat([x, x.flip(3)])).log_softmax(1)
        return (both[: len(x)] + both[len(x) :]) / 2


def _concat_inputs(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``score_inputs`` of consecutive blocks as one (the part itself when there is one)."""
    if len(parts) == 1:
        return parts[0]
    return {k: None if parts[0][k] is None else np.concatenate([p[k] for p in parts]) for k in parts[0]}


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
