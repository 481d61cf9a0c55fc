"""Evaluation: metrics as pure functions, the HTML report, and ``evaluate(run, data)``."""

from fovea.evaluation._diagnosis import diagnose, format_diagnosis
from fovea.evaluation._evaluate import evaluate
from fovea.evaluation._metrics import accuracy_interval, classification_metrics
from fovea.evaluation._report import CSS as REPORT_CSS
from fovea.evaluation._report import _png as figure_html
from fovea.evaluation._report import _table as table_html
from fovea.evaluation._report import write_report

__all__ = ["REPORT_CSS", "accuracy_interval", "classification_metrics", "diagnose", "evaluate", "figure_html",
           "format_diagnosis", "table_html", "write_report"]
