"""Monitoring a deployed model: data drift (embeddings, image statistics, labels, confidence) against the
reference saved at training time, and concept drift once feedback brings the true labels."""

from fovea.monitor._concept import ConceptResult, concept_drift, expected_calibration_error
from fovea.monitor._drift import FAMILIES, DriftResult, detect, mmd_permutation_test
from fovea.monitor._reference import (
    REFERENCE,
    Sample,
    build_reference,
    load_reference,
    observe,
    observe_files,
    save_reference,
)
from fovea.monitor._stats import STATS, header_size, image_stats

__all__ = ["FAMILIES", "REFERENCE", "STATS", "ConceptResult", "DriftResult", "Sample", "build_reference",
           "concept_drift", "detect", "expected_calibration_error", "header_size", "image_stats",
           "load_reference", "mmd_permutation_test", "observe", "observe_files", "save_reference"]
