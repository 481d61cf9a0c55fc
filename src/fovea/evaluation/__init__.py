"""Evaluation: metrics as pure functions, the HTML report, and ``evaluate(run, data)``."""

from fovea.evaluation._diagnosis import diagnose, format_diagnosis
from fovea.evaluation._evaluate import evaluate
from fovea.evaluation._metrics import accuracy_interval, classification_metrics
from fovea.evaluation._report import write_report

__all__ = ["accuracy_interval", "classification_metrics", "diagnose", "evaluate", "format_diagnosis", "write_report"]
