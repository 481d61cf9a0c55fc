"""The reference a deployed model is compared with: what its validation data looked like to it.

Saved by ``fovea train`` as ``reference.npz`` in the artifact (and copied by the registry): the penultimate
layer's embeddings, the image statistics, the predicted probabilities and the true labels of up to
``MAX_REFERENCE`` validation images, computed through the loaded artifact exactly as serving computes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fovea.artifact import REFERENCE
from fovea.errors import FoveaError
from fovea.monitor._stats import header_size, image_stats

MAX_REFERENCE = 2000


@dataclass
class Observations:
    """Images as a model saw them: one row per image (a reference, or a window of traffic)."""

    probabilities: np.ndarray  # (N, C)
    stats: np.ndarray  # (N, len(STATS))
    embeddings: np.ndarray | None = None  # (N, D)
    labels: np.ndarray | None = None  # (N,) true class indexes, -1 where unknown
    unknown_scores: np.ndarray | None = None  # (N,) the model's unknown-image score (None: a closed-set model)

    def __len__(self) -> int:
        return len(self.probabilities)

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(1)


def observe(model: Any, images: torch.Tensor, sizes: Sequence[tuple[int, int]], batch_size: int = 256) -> Observations:
    """Probabilities, embeddings, unknown scores and statistics of decoded uint8 images (N, 3, S, S) through
    ``model``."""
    outs = [model.outputs(images[i : i + batch_size], embed=True) for i in range(0, len(images), batch_size)]
    c = len(model.classes)
    probs = np.concatenate([o.probabilities for o in outs]) if outs else np.zeros((0, c), np.float32)
    emb = None if not outs or any(o.embeddings is None for o in outs) else np.concatenate(
        [o.embeddings for o in outs]).astype(np.float32)  # None where the runtime exposes no embedding
    unknown = None if not outs or any(o.unknown_scores is None for o in outs) else np.concatenate(
        [o.unknown_scores for o in outs]).astype(np.float32)
    return Observations(probs, image_stats(images, list(sizes)), emb, unknown_scores=unknown)


def observe_files(model: Any, paths: Sequence[str | Path]) -> tuple[Observations, list[tuple[str, str]]]:
    """``observe`` for image files; returns the sample and the files that could not be read."""
    x, kept, bad = model.load_images(paths)
    sample = observe(model, x, [header_size(paths[i]) for i in kept])
    return sample, [(str(paths[i]), r) for i, r in bad]


def save_reference(folder: str | Path, sample: Observations) -> Path:
    path = Path(folder) / REFERENCE
    arrays: dict[str, np.ndarray] = {"probabilities": sample.probabilities, "stats": sample.stats}
    if sample.embeddings is not None:
        arrays["embeddings"] = sample.embeddings
    if sample.labels is not None:
        arrays["labels"] = sample.labels
    if sample.unknown_scores is not None:
        arrays["unknown_scores"] = sample.unknown_scores
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]  # arrays only: read back with allow_pickle=False
    return path


def load_reference(folder: str | Path) -> Observations:
    path = Path(folder) / REFERENCE
    if not path.exists():
        raise FoveaError(f"{folder} has no drift reference ({REFERENCE}); models trained before it existed can get "
                         f"one: fovea drift --model {folder} --build-reference VALIDATION_DIR")
    try:
        with np.load(path, allow_pickle=False) as z:
            return Observations(z["probabilities"], z["stats"], z["embeddings"] if "embeddings" in z else None,
                                z["labels"] if "labels" in z else None,
                                z["unknown_scores"] if "unknown_scores" in z else None)
    except (OSError, ValueError, KeyError) as e:
        raise FoveaError(f"{path} is not a drift reference: {e}") from e


def forget_unknown_scores(folder: str | Path) -> bool:
    """Drop the unknown scores from the drift reference in ``folder`` (when it has them): they were another score's
    (a recalibrated model, or a compressed copy scoring with energy), so not comparable with the new one's; the
    unknown-rate test then waits for a rebuilt reference. True when something was dropped."""
    if not (Path(folder) / REFERENCE).exists():
        return False
    ref = load_reference(folder)
    if ref.unknown_scores is None:
        return False
    ref.unknown_scores = None
    save_reference(folder, ref)
    return True


def build_reference(model: Any, images: torch.Tensor, sizes: Sequence[tuple[int, int]],
                    labels: np.ndarray | None = None, seed: int = 0) -> Observations:
    """The reference from (up to ``MAX_REFERENCE``, a seeded sample of) validation images."""
    idx = np.arange(len(images))
    if len(idx) > MAX_REFERENCE:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), MAX_REFERENCE, replace=False))
    sample = observe(model, images[torch.from_numpy(idx)], [sizes[int(i)] for i in idx])
    if labels is not None:
        sample.labels = np.asarray(labels)[idx].astype(np.int64)
    return sample
