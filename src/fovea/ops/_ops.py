"""The registry of classical image operations, each a small function over OpenCV.

Every operation takes a uint8 image, (H, W) gray or (H, W, 3) RGB, plus typed keyword parameters whose
defaults are in its signature, and returns a uint8 image of the same height and width: (H, W) for a
gray result or a mask (0/255), (H, W, 3) otherwise. Colour input is read as RGB (the decoder's order),
never BGR. Operations that work on intensity turn colour input to gray first (ITU-R BT.601 luma, as
OpenCV's RGB2GRAY); contrast operations on colour work on the L* channel of CIE L*a*b*, so colours keep
their hue. Parameters are checked before OpenCV sees them, so a bad value is a one-line FoveaError and
never an OpenCV assertion.

Longer than 500 lines on purpose: it is a catalogue of ~30 operations of a few lines each, registered by a
decorator, and reads best as one list (as timm keeps one file per architecture family).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from fovea.errors import FoveaError

# The course shows its three edge detectors only as pictures; these are the Prewitt-style 3 x 3 kernels
# that such demos use (each sums to 0: flat regions give 0). horizontal responds to horizontal edges
# (a change from top to bottom), vertical to vertical ones (left to right), diagonal to a 45-degree edge.
# The others are the classic ones of setosa.io/ev/image-kernels, which the fast.ai notes point to.
KERNELS: dict[str, tuple[tuple[float, ...], ...]] = {
    "horizontal": ((1, 1, 1), (0, 0, 0), (-1, -1, -1)),
    "vertical": ((1, 0, -1), (1, 0, -1), (1, 0, -1)),
    "diagonal": ((0, 1, 1), (-1, 0, 1), (-1, -1, 0)),
    "sobel_x": ((1, 0, -1), (2, 0, -2), (1, 0, -1)),
    "sobel_y": ((1, 2, 1), (0, 0, 0), (-1, -2, -1)),
    "outline": ((-1, -1, -1), (-1, 8, -1), (-1, -1, -1)),
    "sharpen": ((0, -1, 0), (-1, 5, -1), (0, -1, 0)),
    "emboss": ((-2, -1, 0), (-1, 1, 1), (0, 1, 2)),
    "blur": ((1 / 9,) * 3,) * 3,
    "gaussian": ((1 / 16, 2 / 16, 1 / 16), (2 / 16, 4 / 16, 2 / 16), (1 / 16, 2 / 16, 1 / 16)),
}
SHAPES = {"rect": cv2.MORPH_RECT, "ellipse": cv2.MORPH_ELLIPSE, "cross": cv2.MORPH_CROSS}
MAX_KERNEL = 31  # a bigger custom kernel is almost surely a typo, and filter2D's cost grows with its area

# Op kinds, in the order `fovea ops list` and the gallery show them.
KINDS = ("colour", "contrast", "threshold", "mask", "morphology", "edges", "filter", "segment", "shapes")


@dataclass(frozen=True)
class Op:
    """One registered operation."""

    name: str
    fn: Callable[..., np.ndarray]
    kind: str
    help: str
    params: dict[str, Any]  # name -> default; the default's type is the parameter's type
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    inputs: int = 1  # 2: and/or/xor combine two masks
    preprocess: bool = True  # usable as a training step: one image in, one image of the same size out

    def signature(self) -> str:
        def one(k: str, v: Any) -> str:
            return f"{k}={'|'.join(self.choices[k])}" if k in self.choices else f"{k}={v}"

        return " ".join(one(k, v) for k, v in self.params.items())

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """All parameters with defaults filled in and values converted to their types (strings are parsed)."""
        out = dict(self.params)
        for key, value in params.items():
            k = key.replace("-", "_")
            if k not in self.params:
                takes = f"takes {self.signature()}" if self.params else "takes no parameters"
                raise FoveaError(f"{self.name} has no parameter {key!r}; it {takes}")
            out[k] = _coerce(self.name, k, value, self.params[k])
            if k in self.choices and out[k] not in self.choices[k]:
                raise FoveaError(f"{self.name}: {k} must be one of {', '.join(self.choices[k])}, not {value!r}")
        return out


def _coerce(op: str, key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    elif kind is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif isinstance(value, str):
        return value.strip()
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    raise FoveaError(f"{op}: {key} must be {names.get(kind, kind.__name__)}, got {value!r}")


_REGISTRY: dict[str, Op] = {}


def register(name: str, kind: str, *, choices: dict[str, tuple[str, ...]] | None = None, inputs: int = 1,
             preprocess: bool = True) -> Callable[[Callable[..., np.ndarray]], Callable[..., np.ndarray]]:
    """Add a function to the registry; its keyword defaults are the parameters, its docstring the help."""

    def wrap(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        sig = inspect.signature(fn)
        params = {p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        _REGISTRY[name] = Op(name, fn, kind, doc, params, choices or {}, inputs, preprocess and inputs == 1)
        return fn

    return wrap


def get_op(name: str) -> Op:
    op = _REGISTRY.get(name.strip().lower())
    if op is None:
        close = difflib.get_close_matches(name.strip().lower(), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise FoveaError(f"unknown operation {name!r}{hint}; choose from {', '.join(_REGISTRY)}")
    return op


def list_ops() -> list[Op]:
    """Every operation, grouped by kind."""
    return sorted(_REGISTRY.values(), key=lambda o: KINDS.index(o.kind))


def check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    ):
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise FoveaError(f"{what} must be a uint8 array (H, W) or (H, W, 3), got {desc}")
    if min(image.shape[:2]) < 1:
        raise FoveaError(f"{what} is empty: {image.shape}")
    return image


def apply(name: str, image: np.ndarray, other: np.ndarray | None = None, **params: Any) -> np.ndarray:
    """Run operation ``name`` on ``image`` (and ``other``, the second mask of and/or/xor)."""
    op = get_op(name)
    full = op.check_params(params)
    check_image(image)
    if op.inputs == 2:
        if other is None:
            raise FoveaError(f"{op.name} combines two masks: give the second one (--mask2 in the CLI)")
        check_image(other, "second mask")
        if other.shape[:2] != image.shape[:2]:
            raise FoveaError(f"{op.name}: the masks differ in size, {image.shape[1]}x{image.shape[0]} and "
                             f"{other.shape[1]}x{other.shape[0]}")
        return op.fn(image, other, **full)
    if other is not None:
        raise FoveaError(f"{op.name} takes one image; only and, or and xor take a second mask")
    return op.fn(image, **full)


def to_gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def to_rgb(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise FoveaError(message)


def _odd(op: str, key: str, value: int, low: int = 1) -> None:
    _need(value >= low and value % 2 == 1, f"{op}: {key} must be an odd integer >= {low}, got {value}")


def _on_lightness(image: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a gray-level mapping to a gray image, or to the L* channel of a colour one."""
    if image.ndim == 2:
        return fn(image)
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[..., 0] = fn(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def _binary(image: np.ndarray) -> np.ndarray:
    """A mask as 0/255: gray >= 128 is on (so a mask saved as JPEG, or read back as RGB, still works)."""
    return np.where(to_gray(image) >= 128, np.uint8(255), np.uint8(0))


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# --- colour spaces -------------------------------------------------------------------------------


@register("gray", "colour")
def gray(image: np.ndarray) -> np.ndarray:
    """Grayscale: one channel, luma 0.299 R + 0.587 G + 0.114 B."""
    return to_gray(image)


@register("hsv", "colour")
def hsv(image: np.ndarray) -> np.ndarray:
    """HSV as 3 uint8 channels: hue 0-179 (degrees / 2), saturation and value 0-255."""
    return cv2.cvtColor(to_rgb(image), cv2.COLOR_RGB2HSV)


@register("rgb", "colour")
def rgb(image: np.ndarray) -> np.ndarray:
    """Back to RGB: a gray image gets 3 equal channels; a 3-channel input is read as HSV (from `hsv`)."""
    return to_rgb(image) if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_HSV2RGB)


# --- contrast ------------------------------------------------------------------------------------


@register("stretch", "contrast")
def stretch(image: np.ndarray, *, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """Contrast stretching: the low and high percentiles of intensity map to 0 and 255, linearly."""
    _need(0 <= low < high <= 100, f"stretch: need 0 <= low < high <= 100 (percentiles), got low={low} high={high}")
    lo, hi = np.percentile(image, [low, high])  # over all channels: one mapping keeps the hue
    if hi <= lo:  # a flat image has no contrast to stretch
        return image.copy()
    return _to_u8((image.astype(np.float32) - lo) * (255.0 / (hi - lo)))


@register("equalize", "contrast")
def equalize(image: np.ndarray) -> np.ndarray:
    """Histogram equalization: intensities spread so their histogram is about flat."""
    return _on_lightness(image, cv2.equalizeHist)


@register("clahe", "contrast")
def clahe(image: np.ndarray, *, clip: float = 2.0, tile: int = 8) -> np.ndarray:
    """CLAHE: equalization per tile of a tile x tile grid, each histogram clipped at clip x its mean."""
    _need(clip > 0, f"clahe: clip must be > 0, got {clip}")
    _need(1 <= tile <= 64, f"clahe: tile (tiles per side) must be in 1..64, got {tile}")
    c = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tile, tile))
    return _on_lightness(image, c.apply)


# --- thresholds ----------------------------------------------------------------------------------


@register("threshold", "threshold")
def threshold(image: np.ndarray, *, value: int = 127) -> np.ndarray:
    """Global threshold: gray > value is 255, the rest 0."""
    _need(0 <= value <= 255, f"threshold: value must be in 0..255, got {value}")
    return cv2.threshold(to_gray(image), value, 255, cv2.THRESH_BINARY)[1]


def otsu_level(image: np.ndarray) -> int:
    """Otsu's threshold: the gray level that minimises the intra-class variance of the two sides."""
    return int(cv2.threshold(to_gray(image), 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)[0])


@register("otsu", "threshold")
def otsu(image: np.ndarray) -> np.ndarray:
    """Otsu's threshold, chosen from the histogram (Otsu 1979): gray > level is 255."""
    return cv2.threshold(to_gray(image), 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)[1]


@register("adaptive", "threshold", choices={"method": ("gaussian", "mean")})
def adaptive(image: np.ndarray, *, block: int = 11, c: int = 2, method: str = "gaussian") -> np.ndarray:
    """Adaptive threshold: a pixel is 255 when above its block x block neighbourhood's (weighted) mean - c."""
    _odd("adaptive", "block", block, 3)
    m = cv2.ADAPTIVE_THRESH_GAUSSIAN_C if method == "gaussian" else cv2.ADAPTIVE_THRESH_MEAN_C
    return cv2.adaptiveThreshold(to_gray(image), 255, m, cv2.THRESH_BINARY, block, c)


@register("invert", "contrast")
def invert(image: np.ndarray) -> np.ndarray:
    """Negative image: 255 - x for every pixel and channel."""
    return cv2.bitwise_not(image)


# --- masks ---------------------------------------------------------------------------------------


@register("and", "mask", inputs=2)
def and_(image: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Bitwise AND of two masks (gray >= 128 is on): on where both are."""
    return cv2.bitwise_and(_binary(image), _binary(other))


@register("or", "mask", inputs=2)
def or_(image: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Bitwise OR of two masks: on where either is."""
    return cv2.bitwise_or(_binary(image), _binary(other))


@register("xor", "mask", inputs=2)
def xor(image: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Bitwise XOR of two masks: on where exactly one is."""
    return cv2.bitwise_xor(_binary(image), _binary(other))


@register("not", "mask")
def not_(image: np.ndarray) -> np.ndarray:
    """Bitwise NOT of a mask: on where it is off (`invert` is the negative of any image)."""
    return cv2.bitwise_not(_binary(image))


# --- morphology ----------------------------------------------------------------------------------


def _element(op: str, size: int, shape: str, iterations: int) -> np.ndarray:
    _need(1 <= size <= 99, f"{op}: size (of the structuring element) must be in 1..99, got {size}")
    _need(1 <= iterations <= 100, f"{op}: iterations must be in 1..100, got {iterations}")
    return cv2.getStructuringElement(SHAPES[shape], (size, size))


_SHAPE = {"shape": tuple(SHAPES)}


@register("erode", "morphology", choices=_SHAPE)
def erode(image: np.ndarray, *, size: int = 3, shape: str = "rect", iterations: int = 1) -> np.ndarray:
    """Erosion: a pixel keeps its value only where the element fits in the bright region (the minimum)."""
    return cv2.erode(image, _element("erode", size, shape, iterations), iterations=iterations)


@register("dilate", "morphology", choices=_SHAPE)
def dilate(image: np.ndarray, *, size: int = 3, shape: str = "rect", iterations: int = 1) -> np.ndarray:
    """Dilation: the maximum under the structuring element; bright regions grow."""
    return cv2.dilate(image, _element("dilate", size, shape, iterations), iterations=iterations)


@register("open", "morphology", choices=_SHAPE)
def open_(image: np.ndarray, *, size: int = 3, shape: str = "rect", iterations: int = 1) -> np.ndarray:
    """Opening: erosion then dilation; removes bright specks smaller than the element."""
    k = _element("open", size, shape, iterations)
    return cv2.morphologyEx(image, cv2.MORPH_OPEN, k, iterations=iterations)


@register("close", "morphology", choices=_SHAPE)
def close(image: np.ndarray, *, size: int = 3, shape: str = "rect", iterations: int = 1) -> np.ndarray:
    """Closing: dilation then erosion; fills dark holes and gaps smaller than the element."""
    k = _element("close", size, shape, iterations)
    return cv2.morphologyEx(image, cv2.MORPH_CLOSE, k, iterations=iterations)


# --- edges ---------------------------------------------------------------------------------------


def _reach(kernel: np.ndarray) -> float:
    """The largest response of a zero-sum kernel on 0..1 input: the sum of its positive weights."""
    return float(kernel[kernel > 0].sum())


def _deriv(dx: int, dy: int, size: int) -> np.ndarray:
    """The 2-D derivative kernel OpenCV's Sobel (size >= 1) or Scharr (size -1) applies."""
    kx, ky = cv2.getDerivKernels(dx, dy, size)
    return ky @ kx.T  # (size, size): rows follow y, columns x


def _gradient(image: np.ndarray, dx: int, dy: int, size: int) -> np.ndarray:
    """|derivative| in x, in y, or the magnitude of both, scaled so a 0 -> 255 step edge gives 255.

    Unscaled, a Sobel 3 x 3 response reaches 4 x 255 and Scharr's 16 x 255, so most of an image
    saturates at 255; scaled, the value reads as the edge's contrast in gray levels.
    """
    g = to_gray(image).astype(np.float32)
    parts = []
    for ox, oy in ((dx, 0), (0, dy)):
        if ox or oy:
            k = _deriv(ox, oy, size)
            parts.append(cv2.filter2D(g, -1, k / _reach(k), borderType=cv2.BORDER_REFLECT_101))
    mag = cv2.magnitude(parts[0], parts[1]) if len(parts) == 2 else np.abs(parts[0])
    return _to_u8(mag)


@register("sobel", "edges")
def sobel(image: np.ndarray, *, dx: int = 1, dy: int = 1, size: int = 3) -> np.ndarray:
    """Sobel derivative of order dx in x (dx=1, dy=0: vertical edges) and dy in y; magnitude when both.

    Scaled so a 0 -> 255 step edge gives 255 (OpenCV's raw response is up to 4 x larger at size 3).
    """
    _need(0 <= dx <= 2 and 0 <= dy <= 2 and dx + dy > 0,
          f"sobel: dx and dy are derivative orders 0..2, not both 0; got dx={dx} dy={dy}")
    _need(size in (3, 5, 7), f"sobel: size must be 3, 5 or 7, got {size}")
    return _gradient(image, dx, dy, size)


@register("scharr", "edges")
def scharr(image: np.ndarray, *, dx: int = 1, dy: int = 1) -> np.ndarray:
    """Scharr derivative (a 3 x 3 Sobel with better rotation symmetry); magnitude when dx and dy are both 1."""
    _need(dx in (0, 1) and dy in (0, 1) and dx + dy > 0,
          f"scharr: dx and dy are 0 or 1, not both 0; got dx={dx} dy={dy}")
    return _gradient(image, dx, dy, cv2.FILTER_SCHARR)


@register("laplacian", "edges")
def laplacian(image: np.ndarray, *, size: int = 3) -> np.ndarray:
    """|Laplacian| (d2/dx2 + d2/dy2), scaled so a one-pixel line of 255 on 0 gives 255; marks both sides of an edge."""
    _need(size in (3, 5, 7), f"laplacian: size must be 3, 5 or 7, got {size}")
    k = _deriv(2, 0, size) + _deriv(0, 2, size)
    return _to_u8(np.abs(cv2.filter2D(to_gray(image).astype(np.float32), -1, k / _reach(k),
                                      borderType=cv2.BORDER_REFLECT_101)))


@register("canny", "edges")
def canny(image: np.ndarray, *, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges (Canny 1986): thin 0/255 edges; gradients above high start one, above low continue it."""
    _need(0 <= low < high, f"canny: need 0 <= low < high, got low={low} high={high}")
    return cv2.Canny(to_gray(image), low, high)


# --- filters -------------------------------------------------------------------------------------


def parse_kernel(spec: str) -> np.ndarray:
    """A built-in kernel's name, or rows separated by ';' or '/' of numbers separated by ',' or spaces."""
    name = spec.strip().lower()
    if name in KERNELS:
        return np.array(KERNELS[name], np.float32)
    rows = [r.replace(",", " ").split() for r in spec.replace("/", ";").split(";") if r.strip()]
    try:
        k = np.array([[float(v) for v in r] for r in rows], np.float32)
    except ValueError:
        k = np.zeros((0, 0), np.float32)
    if not rows or k.ndim != 2 or k.size == 0:
        raise FoveaError(f"conv: kernel {spec!r} is neither a built-in ({', '.join(KERNELS)}) nor rows of numbers "
                         "like '1,0,-1;2,0,-2;1,0,-1' (all rows the same length)")
    if max(k.shape) > MAX_KERNEL or not np.isfinite(k).all():
        raise FoveaError(f"conv: kernel must be finite numbers at most {MAX_KERNEL} x {MAX_KERNEL}, got {k.shape[0]} x {k.shape[1]}")
    return k


@register("conv", "filter")
def conv(image: np.ndarray, *, kernel: str = "vertical") -> np.ndarray:
    """Convolution with a kernel (built-in name or rows like 1,0,-1;2,0,-2;1,0,-1), per channel.

    A true convolution (the kernel flipped, as scipy's convolve2d in the course), edges replicated. For a
    kernel summing to 0 (an edge detector) the result is |response|, so edges of both polarities show;
    otherwise it is clipped to 0..255 (a blur or sharpen keeps brightness).
    """
    k = parse_kernel(kernel)
    out = cv2.filter2D(image.astype(np.float32), -1, cv2.flip(k, -1), borderType=cv2.BORDER_REPLICATE)
    return _to_u8(np.abs(out) if abs(float(k.sum())) < 1e-6 else out)


@register("blur", "filter")
def blur(image: np.ndarray, *, size: int = 5) -> np.ndarray:
    """Gaussian blur with a size x size kernel (sigma from the size, as OpenCV)."""
    _odd("blur", "size", size)
    _need(size <= 99, f"blur: size must be at most 99, got {size}")
    return cv2.GaussianBlur(image, (size, size), 0)


@register("median", "filter")
def median(image: np.ndarray, *, size: int = 5) -> np.ndarray:
    """Median filter: each pixel the median of its size x size neighbourhood; removes salt-and-pepper noise."""
    _odd("median", "size", size)
    _need(size <= 99, f"median: size must be at most 99, got {size}")
    return cv2.medianBlur(image, size)


# --- segmentation: k-means colour clusters ---------------------------------------------------------


@dataclass
class Clusters:
    """K-means colour segmentation: every pixel replaced by its cluster's centre colour."""

    centres: np.ndarray  # (k, 3) uint8 RGB (or (k, 1) gray), clusters ordered by share, largest first
    shares: list[float]  # of the pixels in each cluster
    labels: np.ndarray  # (H, W) int32 cluster index per pixel (in the order above)
    image: np.ndarray  # the input with each pixel its cluster's centre


def kmeans_clusters(image: np.ndarray, *, k: int = 4, attempts: int = 3, iterations: int = 20, seed: int = 0) -> Clusters:
    """Cluster the pixels' colours (RGB, or gray) into ``k`` groups with cv2.kmeans (k-means++ seeding, the best of
    ``attempts`` runs by compactness), seeded, so the same image always gives the same segmentation - which a
    --preprocess step needs. Clusters are numbered by size, so labels do not depend on the random start either."""
    check_image(image)
    _need(1 <= k <= 64, f"kmeans: k must be in 1..64, got {k}")
    _need(1 <= attempts <= 20, f"kmeans: attempts must be in 1..20, got {attempts}")
    _need(1 <= iterations <= 500, f"kmeans: iterations must be in 1..500, got {iterations}")
    pixels = image.reshape(-1, 1 if image.ndim == 2 else 3).astype(np.float32)
    k = min(k, len(pixels))
    cv2.setRNGSeed(seed)  # cv2.kmeans draws from OpenCV's RNG: seeded here, the result repeats
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, iterations, 0.5)
    _, labels, centres = cv2.kmeans(pixels, k, None, criteria, attempts, cv2.KMEANS_PP_CENTERS)  # type: ignore[call-overload]
    counts = np.bincount(labels.ravel(), minlength=k)
    order = np.argsort(-counts, kind="stable")  # largest cluster first
    rank = np.empty(k, np.int32)
    rank[order] = np.arange(k, dtype=np.int32)
    centres_u8 = _to_u8(centres[order])
    labels = rank[labels.ravel()].reshape(image.shape[:2])
    return Clusters(centres_u8, [float(c) / len(pixels) for c in counts[order]], labels,
                    centres_u8[labels].reshape(image.shape))


@register("kmeans", "segment")
def kmeans(image: np.ndarray, *, k: int = 4, attempts: int = 3, iterations: int = 20, seed: int = 0) -> np.ndarray:
    """K-means colour segmentation: each pixel becomes the centre colour of its cluster (k clusters); see kmeans_clusters."""
    return kmeans_clusters(image, k=k, attempts=attempts, iterations=iterations, seed=seed).image


# --- shapes: contours and lines ------------------------------------------------------------------


@dataclass
class Contours:
    """Outer contours of the bright (or dark) regions of a thresholded image."""

    count: int
    areas: list[float]  # px^2 of each contour's polygon (through the boundary pixels' centres), largest first
    level: int  # the threshold used
    image: np.ndarray  # (H, W, 3) the input with the contours drawn in green


@dataclass
class Lines:
    """Line segments found by the probabilistic Hough transform on Canny edges."""

    lines: list[tuple[int, int, int, int]]  # (x1, y1, x2, y2), longest first
    image: np.ndarray  # (H, W, 3) the input with the segments drawn in red


def find_contours(image: np.ndarray, *, threshold: int = -1, objects: str = "bright", min_area: float = 0.0,
                  thickness: int = 1) -> Contours:
    """Threshold (``-1``: Otsu's level), then trace the outer contour of every region.

    Areas are cv2.contourArea's: the polygon through the centres of the boundary pixels, so a filled
    w x h rectangle has (w - 1) x (h - 1), and a one-pixel speck 0. ``min_area`` drops smaller ones.
    """
    check_image(image)
    _need(-1 <= threshold <= 255, f"contours: threshold must be in 0..255 (or -1 for Otsu's), got {threshold}")
    _need(objects in ("bright", "dark"), f"contours: objects must be bright or dark, not {objects!r}")
    _need(min_area >= 0, f"contours: min_area must be >= 0, got {min_area}")
    _need(1 <= thickness <= 20, f"contours: thickness must be in 1..20, got {thickness}")
    g = to_gray(image)
    level = otsu_level(g) if threshold < 0 else threshold
    mode = cv2.THRESH_BINARY if objects == "bright" else cv2.THRESH_BINARY_INV
    mask = cv2.threshold(g, level, 255, mode)[1]
    found, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    kept = sorted(((cv2.contourArea(c), c) for c in found), key=lambda ac: -ac[0])
    kept = [(a, c) for a, c in kept if a >= min_area]
    drawn = to_rgb(image).copy()
    cv2.drawContours(drawn, [c for _, c in kept], -1, (0, 255, 0), thickness)
    return Contours(len(kept), [float(a) for a, _ in kept], level, drawn)


def find_lines(image: np.ndarray, *, threshold: int = 40, min_length: int = 30, max_gap: int = 3, blur: int = 5,
               low: int = 50, high: int = 150, thickness: int = 1) -> Lines:
    """Gaussian blur, Canny edges (low, high), then cv2.HoughLinesP at 1 px and 1 degree resolution.

    The defaults were picked on pets photos (180 px): without the blur, fur and grass give 25 segments
    per photo (median of 30 cats); with it and 40 votes, a few, mostly on kennels, doors and legs.

    Args:
        threshold: votes (edge pixels on the line) a segment needs.
        min_length: shorter segments are dropped, in px.
        max_gap: the largest gap, in px, between edge pixels joined into one segment.
        blur: Gaussian kernel size before Canny (odd; 1 = none).
    """
    check_image(image)
    _need(threshold >= 1, f"hough: threshold (votes) must be >= 1, got {threshold}")
    _need(min_length >= 0 and max_gap >= 0, f"hough: min_length and max_gap must be >= 0, got {min_length}, {max_gap}")
    _need(1 <= thickness <= 20, f"hough: thickness must be in 1..20, got {thickness}")
    _odd("hough", "blur", blur)
    g = to_gray(image)
    edges = canny(cv2.GaussianBlur(g, (blur, blur), 0) if blur > 1 else g, low=low, high=high)
    found = cv2.HoughLinesP(edges, 1, np.pi / 180, threshold, minLineLength=min_length, maxLineGap=max_gap)
    # (N, 1, 4) in OpenCV 4, (N, 4) in OpenCV 5: reshape covers both.
    segs = [] if found is None else [(int(a), int(b), int(c), int(d)) for a, b, c, d in found.reshape(-1, 4)]
    segs.sort(key=lambda s: -((s[2] - s[0]) ** 2 + (s[3] - s[1]) ** 2))
    drawn = to_rgb(image).copy()
    for x1, y1, x2, y2 in segs:
        cv2.line(drawn, (x1, y1), (x2, y2), (255, 0, 0), thickness)
    return Lines(segs, drawn)


@register("contours", "shapes", choices={"objects": ("bright", "dark")}, preprocess=False)
def contours(image: np.ndarray, *, threshold: int = -1, objects: str = "bright", min_area: float = 0.0,
             thickness: int = 1) -> np.ndarray:
    """Outer contours of the regions above threshold (-1: Otsu's), drawn in green; see find_contours."""
    return find_contours(image, threshold=threshold, objects=objects, min_area=min_area, thickness=thickness).image


@register("hough", "shapes", preprocess=False)
def hough(image: np.ndarray, *, threshold: int = 40, min_length: int = 30, max_gap: int = 3, blur: int = 5,
          low: int = 50, high: int = 150, thickness: int = 1) -> np.ndarray:
    """Straight segments (probabilistic Hough transform on Canny edges), drawn in red; see find_lines."""
    return find_lines(image, threshold=threshold, min_length=min_length, max_gap=max_gap, blur=blur, low=low,
                      high=high, thickness=thickness).image
