"""Monitoring a deployed model: data drift (embeddings, image statistics, labels, confidence) against the
reference saved at training time, and concept drift once feedback brings the true labels.

``run_drift`` is ``fovea drift`` as a function; ``check_drift`` tests one window against a reference;
``detect`` is the statistics alone.
"""

from fovea.artifact import REFERENCE
from fovea.monitor._concept import ConceptResult, concept_drift, expected_calibration_error
from fovea.monitor._drift import FAMILIES, DriftResult, detect, mmd_permutation_test
from fovea.monitor._reference import (
           Observations,
           build_reference,
           forget_unknown_scores,
           load_reference,
           observe,
           observe_files,
           save_reference,
)
from fovea.monitor._report import write_drift_report
from fovea.monitor._run import reference_from_folder, run_drift
from fovea.monitor._stats import STATS, header_size, image_stats
from fovea.monitor._watch import DriftCheck, Window, alert, check_drift, window_from_files, window_from_store

__all__ = ["FAMILIES", "REFERENCE", "STATS", "ConceptResult", "DriftCheck", "DriftResult", "Observations", "Window",
           "alert", "build_reference", "check_drift", "concept_drift", "detect", "expected_calibration_error",
           "forget_unknown_scores",
           "header_size", "image_stats", "load_reference", "mmd_permutation_test", "observe", "observe_files",
           "reference_from_folder", "run_drift", "save_reference", "window_from_files", "window_from_store",
           "write_drift_report"]
