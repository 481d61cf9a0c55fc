"""Data: find images and labels, decode them safely once, batch and augment them on the device."""

from typing import TYPE_CHECKING, Any

from fovea.data._curation import (
    Correction,
    add_correction,
    apply_corrections,
    corrected,
    corrections_file,
    curation_dir,
    read_corrections,
    read_label_issues,
    write_label_issues,
)
from fovea.data._io import IMAGE_EXTENSIONS, load_square, read_image
from fovea.data._layout import Dataset, Sample, discover, eval_samples, kfold, with_groups

if TYPE_CHECKING:
    from fovea.data._cache import ImageSet, load_images
    from fovea.data._check import check
    from fovea.data._disk import STORE_CHOICES, DiskBatches, choose_store
    from fovea.data._loader import AUGMENTATIONS, Batches, augment, norm_coefficients, normalize

# The cache and the batches need torch (2-3 s to import); reading images and finding data sets do not, so
# commands such as `fovea ops` and `fovea check` start without it.
_NEEDS_TORCH = {"ImageSet": "_cache", "load_images": "_cache", "AUGMENTATIONS": "_loader", "Batches": "_loader",
                "augment": "_loader", "normalize": "_loader", "norm_coefficients": "_loader", "DiskBatches": "_disk",
                "choose_store": "_disk", "STORE_CHOICES": "_disk"}
_LAZY = {**_NEEDS_TORCH, "check": "_check"}  # fovea check: perceptual hashes, only when checking


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"fovea.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fovea.data' has no attribute {name!r}")


__all__ = [
    "AUGMENTATIONS", "IMAGE_EXTENSIONS", "STORE_CHOICES", "Batches", "Correction", "DiskBatches", "choose_store", "Dataset", "ImageSet", "Sample", "add_correction",
    "apply_corrections", "augment", "check", "corrected", "corrections_file", "curation_dir", "discover", "read_corrections",
    "read_label_issues", "write_label_issues",
    "eval_samples",
    "kfold", "load_images", "load_square", "norm_coefficients", "normalize", "read_image", "with_groups",
]
