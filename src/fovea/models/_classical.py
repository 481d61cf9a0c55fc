"""Classical models: handcrafted features into a fitted classifier, as ``nn.Module``s (``hog-svm``, ``colorhist-nb``).

The course's "classic ML" pipeline (seed 004: image classification with SVM, naive Bayes, logistic regression):
features a person designed - HOG (Dalal & Triggs 2005), colour histograms, local binary patterns (Ojala et al.
2002) - standardised, then a classifier fitted by scikit-learn (``fovea.training._classical``). Every fitted
number - the standardisation, a linear model's weights, naive Bayes' means and variances, k-NN's stored
training features - is a frozen ``nn.Parameter`` of the module, so the artifact is the same safetensors + JSON as
any network's (no pickle), and predict, evaluate, batch and serve run it through ``TorchModel`` unchanged.

Why scikit-image/OpenCV on the CPU and not a torch re-implementation of the features: they are the reference
implementations the course and the literature use (HOG's L2-Hys block normalisation, LBP's uniform patterns), a
torch copy would need checking against them for every option, and they cost under a millisecond per 64 px image
on one core (HOG 0.7 ms, LBP 0.4 ms, an HSV histogram 0.02 ms, measured on the 2-core EPYC of docs/course.md),
which is less than a small CNN's forward pass. The price: no gradient reaches the pixels, so Grad-CAM and other
gradient maps do not apply (``no_cam`` says why), and ONNX / torch.export cannot trace the features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fovea.errors import FoveaError
from fovea.models._architectures import Headed, register_model

DEFAULT_SIZE = 64  # HOG of 8 px cells at 64 px beat 96 and 128 px on pets (71.5, 69.8, 69.5 % val; linear SVM, C 1e-4)
HOG_CELL, HOG_BLOCK, HOG_BINS = 8, 2, 9  # Dalal & Triggs' defaults: 8 px cells, 2 x 2 blocks, 9 orientations
HIST_BINS = 8  # per HSV channel: 512 bins
LBP_POINTS, LBP_GRID = 8, 4  # 8 neighbours at radius 1, "uniform" codes (10 of them), one histogram per 4 x 4 cell


def _gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def hog_features(rgb: np.ndarray) -> np.ndarray:
    """HOG of the gray image (skimage, L2-Hys blocks): (blocks^2 * 2 * 2 * 9,), 1764 at 64 px."""
    from skimage.feature import hog

    return hog(_gray(rgb), orientations=HOG_BINS, pixels_per_cell=(HOG_CELL, HOG_CELL),
               cells_per_block=(HOG_BLOCK, HOG_BLOCK), block_norm="L2-Hys", feature_vector=True).astype(np.float32)


def colorhist_features(rgb: np.ndarray) -> np.ndarray:
    """A joint HSV histogram, 8 bins per channel, as shares of the pixels: (512,). Position-free: colour only."""
    import cv2

    h = cv2.calcHist([cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)], [0, 1, 2], None, [HIST_BINS] * 3,
                     [0, 180, 0, 256, 0, 256]).ravel()
    return (h / max(float(h.sum()), 1.0)).astype(np.float32)


def lbp_features(rgb: np.ndarray) -> np.ndarray:
    """Uniform local binary patterns (8 neighbours, radius 1), a histogram per cell of a 4 x 4 grid: (160,)."""
    from skimage.feature import local_binary_pattern

    codes = local_binary_pattern(_gray(rgb), LBP_POINTS, 1, "uniform").astype(np.int64)  # 0..P+1
    n = LBP_POINTS + 2
    rows, cols = np.array_split(np.arange(codes.shape[0]), LBP_GRID), np.array_split(np.arange(codes.shape[1]), LBP_GRID)
    out = [np.bincount(codes[np.ix_(r, c)].ravel(), minlength=n) / max(len(r) * len(c), 1) for r in rows for c in cols]
    return np.concatenate(out).astype(np.float32)


def _hog_dim(size: int) -> int:
    blocks = max(size // HOG_CELL - HOG_BLOCK + 1, 0)
    return blocks * blocks * HOG_BLOCK * HOG_BLOCK * HOG_BINS


@dataclass(frozen=True)
class Feature:
    """One handcrafted feature: what it is, how to compute it on one RGB uint8 image, its length at a size, and an
    estimate of its arithmetic (what ``fovea summary`` and ``fovea compare`` report as its FLOPs)."""

    name: str
    help: str
    fn: Callable[[np.ndarray], np.ndarray]
    dim: Callable[[int], int]
    # Operations per image, counted by hand from the algorithm (not measured): a rough equivalent of a network's
    # FLOPs, so a table can put the two side by side.
    flops: Callable[[int], int]


# HOG per pixel: gray (5), two central differences (2), magnitude and angle (~10), bilinear vote into 4 bins (~8);
# then every block's 36 values are normalised twice (L2-Hys, ~4 each). Histogram: HSV conversion (~30) and a
# bin index (~6) per pixel. LBP: 8 bilinear samples (~6 each) and 8 comparisons per pixel.
FEATURES: dict[str, Feature] = {f.name: f for f in (
    Feature("hog", "histograms of oriented gradients (shape)", hog_features, _hog_dim,
            lambda s: 25 * s * s + 8 * _hog_dim(s)),
    Feature("colorhist", "HSV colour histogram (colour)", colorhist_features, lambda s: HIST_BINS ** 3,
            lambda s: 36 * s * s),
    Feature("lbp", "local binary patterns on a 4x4 grid (texture)", lbp_features,
            lambda s: LBP_GRID * LBP_GRID * (LBP_POINTS + 2), lambda s: 56 * s * s),
    Feature("combo", "HOG + colour histogram + LBP (shape, colour, texture)",
            lambda rgb: np.concatenate([hog_features(rgb), colorhist_features(rgb), lbp_features(rgb)]),
            lambda s: _hog_dim(s) + HIST_BINS ** 3 + LBP_GRID * LBP_GRID * (LBP_POINTS + 2),
            lambda s: (25 + 36 + 56) * s * s + 8 * _hog_dim(s)),
)}

CLASSIFIERS: dict[str, str] = {
    "svm": "linear SVM, Platt-scaled to probabilities",
    "logreg": "logistic regression",
    "nb": "Gaussian naive Bayes",
    "knn": "k-nearest neighbours (Euclidean, majority of k)",
}


def _frozen(t: torch.Tensor) -> nn.Parameter:
    """A fitted array: stored and counted like a weight, never trained by gradient."""
    return nn.Parameter(t, requires_grad=False)


class GaussianNBHead(nn.Module):
    """Gaussian naive Bayes: log p(c) + sum_d log N(x_d; theta_cd, var_cd), the joint log-likelihood, whose
    softmax is the posterior. Computed as differences (x - theta)^2 / var, not expanded into matrix products:
    with a variance near 0 (a feature almost constant in a class) the expanded form cancels catastrophically in
    float32 (pets' colour histograms fell to 33 % that way)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.theta = _frozen(torch.zeros(num_classes, dim))
        self.var = _frozen(torch.ones(num_classes, dim))
        self.log_prior = _frozen(torch.full((num_classes,), -float(np.log(num_classes))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        const = self.log_prior - 0.5 * torch.log(2 * torch.pi * self.var).sum(1)  # (C,)
        return const - 0.5 * ((x[:, None, :] - self.theta) ** 2 / self.var).sum(2)  # (B, C)

    def flops(self) -> int:
        """Per image: a difference, a square, a division and an add per class and feature (elementwise, which
        torch's counter does not count)."""
        return 4 * self.theta.numel()


class KNNHead(nn.Module):
    """k-nearest neighbours over the stored training features: each class's share of the k nearest (Euclidean),
    as log-probabilities (floored at 1 / (10 k), so a class with no neighbour keeps a finite logit and a rank)."""

    def __init__(self, dim: int, num_classes: int, n_train: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.stored = _frozen(torch.zeros(n_train, dim))
        self.votes = _frozen(torch.zeros(n_train, num_classes))  # one-hot labels of the stored features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = self.votes.shape
        if n == 0:  # not fitted yet (the size probe before training)
            return torch.zeros(len(x), c, device=x.device, dtype=x.dtype)
        # |x - s|^2 = |x|^2 - 2 x.s + |s|^2, as one matrix product (cdist's direct mode differs by rounding only)
        d2 = (x * x).sum(1, keepdim=True) - 2 * x @ self.stored.T + (self.stored * self.stored).sum(1)
        nearest = d2.topk(min(self.k, n), dim=1, largest=False).indices  # (B, k)
        share = self.votes[nearest].mean(1)  # (B, C)
        return torch.log(share.clamp_min(1.0 / (10 * self.k)))


class Classical(Headed):
    """A handcrafted feature, standardised (``mu``, ``sigma``), into a fitted classifier ``head``.

    ``forward`` takes the batch the runtime feeds every model: (B, 3, S, S) floats normalised by this model's
    mean 0 and std 1 (``default_config``), i.e. pixels / 255. It turns them back into uint8 pixels, computes the
    feature of each image on the CPU (see the module docstring), and returns the head's logits. ``forward_features``
    gives the standardised features: the embedding an unknown-image score or ``fovea similar`` reads.
    """

    no_cam = ("a classical model computes handcrafted features outside autograd (scikit-image/OpenCV), so no "
              "gradient reaches a feature map: Grad-CAM and CAM do not apply")
    no_export = ("its features are computed by scikit-image/OpenCV outside torch, which ONNX and torch.export "
                 "cannot trace; fp16, bf16 and int8 weights apply")

    def __init__(self, num_classes: int, image_size: int, feature: str, classifier: str, *, k: int = 15,
                 c: float | None = None, n_train: int = 0) -> None:
        super().__init__()
        if feature not in FEATURES or classifier not in CLASSIFIERS:
            raise FoveaError(f"unknown classical model {feature}-{classifier}")
        if k < 1:
            raise FoveaError(f"k (nearest neighbours) must be at least 1, got {k}")
        if c is not None and c <= 0:
            raise FoveaError(f"c (the inverse regularisation strength) must be positive, got {c}")
        self.feature, self.classifier, self.image_size = FEATURES[feature], classifier, image_size
        self.c, self.k = c, k  # what the fit used: training chooses them by cross-validation unless given
        dim = self.feature.dim(image_size)
        if dim == 0:
            raise FoveaError(f"{feature} needs images of at least {HOG_CELL * HOG_BLOCK} px, not {image_size}")
        self.num_features = dim
        self.mu = _frozen(torch.zeros(dim))
        self.sigma = _frozen(torch.ones(dim))
        self.head: nn.Module
        if classifier in ("svm", "logreg"):
            self.head = nn.Linear(dim, num_classes)
            for p in self.head.parameters():
                p.requires_grad_(False)
        elif classifier == "nb":
            self.head = GaussianNBHead(dim, num_classes)
        else:
            self.head = KNNHead(dim, num_classes, n_train, k)

    def extract(self, images: torch.Tensor) -> np.ndarray:
        """Raw features (N, D) float32 of uint8 images (N, 3, S, S)."""
        pixels = images.permute(0, 2, 3, 1).cpu().numpy()  # (N, S, S, 3) RGB
        if pixels.shape[1] != self.image_size or pixels.shape[2] != self.image_size:
            raise FoveaError(f"{self.feature.name} was fitted on {self.image_size} px images, not "
                             f"{pixels.shape[2]}x{pixels.shape[1]}")
        if len(pixels) == 0:
            return np.zeros((0, self.num_features), np.float32)
        return np.stack([self.feature.fn(np.ascontiguousarray(p)) for p in pixels])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        pixels = (x.detach().float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)  # the uint8 image back
        raw = torch.from_numpy(self.extract(pixels)).to(x.device, self.mu.dtype)  # fp16/bf16 artifacts: theirs
        return (raw - self.mu) / self.sigma  # (B, D)


    def uncounted_flops(self) -> int:
        """Operations of one image that torch's FLOP counter does not see: the handcrafted features (estimated
        from the algorithm) and naive Bayes' elementwise sums. The linear and k-NN heads' products it counts."""
        head = self.head.flops() if isinstance(self.head, GaussianNBHead) else 0
        return int(self.feature.flops(self.image_size)) + head


def _factory(feature: str, classifier: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, image_size: int = DEFAULT_SIZE, **kwargs: Any) -> nn.Module:
        return Classical(num_classes, image_size, feature, classifier, **kwargs)

    build.__name__ = f"{feature}-{classifier}"
    build.__doc__ = f"classical: {FEATURES[feature].help} -> {CLASSIFIERS[classifier]}"
    build.default_size = DEFAULT_SIZE  # type: ignore[attr-defined]
    # The model un-normalises its input to pixels: mean 0 and std 1 make that x * 255, exactly.
    build.config = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "kind": "classical"}  # type: ignore[attr-defined]
    return build


for _feature in FEATURES:
    for _classifier in CLASSIFIERS:
        register_model(_factory(_feature, _classifier))
