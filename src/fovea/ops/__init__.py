"""Classical image operations on OpenCV, as a command (``fovea ops``) and as training preprocessing steps.

    from fovea import ops
    mask = ops.apply("otsu", rgb)                      # (H, W) uint8, 0/255
    edges = ops.apply("conv", rgb, kernel="vertical")   # the course's vertical edge kernel
    found = ops.find_contours(mask)                     # .count, .areas, .image (drawn)
    seg = ops.apply("kmeans", rgb, k=4)                 # each pixel its colour cluster's centre (K-means)
    x = ops.preprocess(rgb, "gray,clahe:clip=3")         # (H, W, 3) RGB uint8, what a model takes

Every operation is a function of a uint8 image ((H, W) gray or (H, W, 3) RGB) and typed keyword
parameters, in a registry (``list_ops``). See ``_ops.py`` for the operations and ``_steps.py`` for how
they become preprocessing steps recorded in a model artifact.
"""

from fovea.ops._gallery import gallery
from fovea.ops._ops import KERNELS, apply, find_contours, find_lines, get_op, kmeans_clusters, list_ops
from fovea.ops._run import OpResult, is_chain, run
from fovea.ops._steps import Step, parse_steps, preprocess

__all__ = [
    "KERNELS", "OpResult", "Step", "apply", "find_contours", "find_lines", "gallery", "get_op", "is_chain",
    "kmeans_clusters", "list_ops", "parse_steps", "preprocess", "run",
]
