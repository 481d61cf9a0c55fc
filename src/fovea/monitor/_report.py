"""The HTML report of one drift check: the verdict, every test, and plots of reference against window."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from fovea._html import CSS, figure_html, table_html
from fovea.monitor._reference import Observations
from fovea.monitor._stats import STATS
from fovea.monitor._watch import DriftCheck


def _stat_plots(reference: Observations, window: Observations) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STATS), figsize=(2.6 * len(STATS), 2.3))
    for j, (ax, name) in enumerate(zip(axes, STATS)):
        a, b = reference.stats[:, j], window.stats[:, j]
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]  # answers logged without statistics have NaN
        if name in ("width", "height", "aspect"):
            a, b = a[a > 0], b[b > 0]  # 0: not recorded
        if not len(a) or not len(b):
            ax.set_title(f"{name}\n(not recorded)", fontsize=9)
            ax.axis("off")
            continue
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 25)
        ax.hist(a, bins, density=True, alpha=0.55, label="reference")
        ax.hist(b, bins, density=True, alpha=0.55, label="window")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    return figure_html(fig)


def _embedding_plot(reference: Observations, window: Observations) -> str:
    import matplotlib.pyplot as plt

    if reference.embeddings is None or window.embeddings is None:
        return "<p>No embeddings: this runtime exposes none.</p>"
    mean = reference.embeddings.mean(0)
    _, _, vt = np.linalg.svd(reference.embeddings - mean, full_matrices=False)
    a, b = (reference.embeddings - mean) @ vt[:2].T, (window.embeddings - mean) @ vt[:2].T
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    ax1.scatter(a[:, 0], a[:, 1], s=6, alpha=0.4, label="reference")
    ax1.scatter(b[:, 0], b[:, 1], s=8, alpha=0.7, label="window")
    ax1.set_title("embeddings, first two principal components", fontsize=9)
    ax1.legend(fontsize=7)
    bins = np.linspace(0, 1, 21)
    ax2.hist(reference.confidence, bins, density=True, alpha=0.55, label="reference")
    ax2.hist(window.confidence, bins, density=True, alpha=0.55, label="window")
    ax2.set_title("confidence (top-class probability)", fontsize=9)
    return figure_html(fig)


def write_drift_report(path: str | Path, result: DriftCheck, reference: Observations) -> Path:
    d = result.drift
    verdict = (f"<p class='bad'><b>Drift</b>: p = {d.p_value:.3g} &lt; {d.alpha} (flagged: "
               f"{html.escape(', '.join(d.flagged()))})</p>" if d.drift else
               f"<p class='good'><b>No drift</b>: p = {d.p_value:.3g} (the smallest family p-value, Bonferroni-"
               f"corrected over {len(d.tests)} families)</p>")
    rows: list[list[Any]] = []
    for t in d.tests:
        worst = t.detail.get("worst", "")
        rows.append([t.family, t.p_value, t.statistic, "yes" if t.p_value < d.alpha else "", worst])
    for fam, why in d.skipped.items():
        rows.append([fam, "—", "—", "", f"not run: {why}"])
    parts = [f"<!doctype html><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
             f"<title>Drift: {html.escape(result.model)}:{result.version}</title><style>{CSS}"
             ".good{color:#176f2c}.bad{color:#b00020}</style>",
             f"<h1>Drift check: {html.escape(result.model)}:{result.version}</h1>",
             f"<p>Window: {d.n_window} images ({html.escape(result.window.source)}"
             + (f", {html.escape(result.window.start or '')} to {html.escape(result.window.end or '')}" if result.window.start else "")
             + f"); reference: {d.n_reference} validation images saved at training.</p>", verdict,
             table_html(rows, ["test", "p-value", "statistic", "flagged", "worst feature / note"])]
    label = d.family("label_shift")
    if label:
        parts.append("<h2>Predicted labels</h2>" + table_html(
            [[c, label.detail["reference"][c], label.detail["window"][c]] for c in label.detail["reference"]],
            ["class", "reference share", "window share"]))
    if result.concept:
        c = result.concept
        parts.append("<h2>Accuracy from feedback</h2>" + table_html(
            [["accuracy", c.reference_accuracy, c.accuracy], ["expected calibration error", c.reference_ece, c.ece],
             ["images with feedback", "", c.n], ["p (accuracy lower than at validation)", "", c.p_value]],
            ["", "validation", "window"]))
    parts += ["<h2>Image statistics</h2>", _stat_plots(reference, result.window.sample),
              "<h2>Embeddings and confidence</h2>", _embedding_plot(reference, result.window.sample)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
