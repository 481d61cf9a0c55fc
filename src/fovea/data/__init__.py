"""Data: find images and labels, decode them safely once, batch and augment them on the device."""

from fovea.data._cache import ImageSet, load_images
from fovea.data._io import IMAGE_EXTENSIONS, load_square, read_image
from fovea.data._layout import Dataset, Sample, discover, eval_samples, kfold, with_groups
from fovea.data._loader import AUGMENTATIONS, Batches, augment, normalize

__all__ = [
    "AUGMENTATIONS", "IMAGE_EXTENSIONS", "Batches", "Dataset", "ImageSet", "Sample", "augment", "discover", "eval_samples",
    "kfold", "load_images", "load_square", "normalize", "read_image", "with_groups",
]
