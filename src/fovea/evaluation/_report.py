"""A single self-contained HTML report: learning curves, confusion matrix, ROC curves, quarantine list."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from fovea._html import CSS, figure_html, format_cell, table_html


def learning_curves(history: list[dict[str, Any]]) -> str:
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    norms = [h.get("grad_norm") for h in history]
    with_norm = any(n is not None for n in norms)  # older runs' history has no gradient norm
    fig, axes = plt.subplots(1, 3 if with_norm else 2, figsize=(15 if with_norm else 10, 3.6))
    a, b = axes[0], axes[1]
    a.plot(ep, [h["train_loss"] for h in history], label="train")
    a.plot(ep, [h["val_loss"] for h in history], label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="Loss")
    b.plot(ep, [h["train_acc"] for h in history], label="train")
    b.plot(ep, [h["val_acc"] for h in history], label="validation")
    b.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    if with_norm:
        # Vanishing gradients: the norm falls towards 0 while the loss stays high; exploding: it jumps by orders of
        # magnitude or turns inf/NaN (a gap in the line). Log scale shows both.
        c = axes[2]
        c.plot(ep, [float("nan") if n is None else n for n in norms], label="mean")
        c.plot(ep, [h.get("grad_norm_max", float("nan")) for h in history], label="max", alpha=0.6)
        c.set(xlabel="epoch", ylabel="L2 norm (before clipping)", title="Gradient norm", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    return figure_html(fig)


def _classical_html(c: dict[str, Any]) -> str:
    """What a classical model is and what was fitted: the feature, the classifier, the chosen hyperparameters."""
    rows = [[k.replace("_", " "), v] for k, v in c.items()]
    return ("<h2>Classical model</h2><p>Handcrafted features into a scikit-learn classifier, fitted in one pass "
            "(no epochs, no gradient); the hyperparameters not given were chosen by cross-validation on the training "
            "images.</p>" + table_html(rows, ["", "value"]))


def confusion_plot(cm: list[list[int]], classes: list[str]) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(cm)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    return figure_html(fig)


def roc_plot(curves: dict[str, dict[str, list[float]]]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for c, cur in curves.items():
        ax.plot(cur["fpr"], cur["tpr"], label=c)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (one vs rest)")
    ax.legend()
    ax.grid(alpha=0.3)
    return figure_html(fig)


def _diagnosis_html(d: dict[str, Any]) -> str:
    human = f"{d['human_error']:.1%}" + ("" if d["human_error_given"] else " (assumed 0: pass --human-error)")
    rows = [["training error (train images, no augmentation)", f"{d['train_error']:.1%}"],
            ["validation error", f"{d['val_error']:.1%}"], ["human-level error", human],
            ["avoidable bias = training - human", f"{d['avoidable_bias']:.1%}"],
            ["variance = validation - training", f"{d['variance']:.1%}"]]
    steps = "".join(f"<li>{html.escape(s)}</li>" for s in d["next_steps"])
    return (f"<h2>Diagnosis: {html.escape(d['verdict'])}</h2>" + table_html(rows, ["", ""])
            + f"<p>{html.escape(d['why'])}.</p><p>Next steps:</p><ul>{steps}</ul>")


def _transfer_html(t: dict[str, Any]) -> str:
    parts = [f"<h2>Transfer learning: {html.escape(str(t['mode']))}</h2>"]
    auto = t.get("auto")
    if auto:
        parts.append(f"<p><b>--mode auto</b> chose <b>{html.escape(str(t['mode']))}</b>: {html.escape(auto['why'])}.</p>")
        rows = [[k, v] for k, v in auto.items() if k != "why"]
        parts.append(table_html(rows, ["measured / rule", "value"]))
    rows = [[k, t[k]] for k in ("freeze", "head_epochs", "frozen_parameters", "trainable_parameters", "embedding_dim") if k in t]
    if rows:
        parts.append(table_html(rows, ["setting", "value"]))
    w = t.get("weights")
    if w:
        parts.append("<h3>Weights</h3><pre>" + html.escape(json.dumps(w, indent=2, default=str)) + "</pre>")
    return "".join(parts)


def _looks_at_html(section: dict[str, Any]) -> str:
    """"What the model looks at": heatmap overlays from ``fovea.explain.looks_at``, embedded as PNG."""
    from PIL import Image

    head = "<h2>What the model looks at</h2>"
    if "absent" in section:
        return head + f"<p>No heatmaps for this model: {html.escape(section['absent'])}.</p>"

    def figures(items: list[dict[str, Any]]) -> str:
        out = []
        for it in items:
            buf = io.BytesIO()
            Image.fromarray(it["overlay"]).save(buf, format="PNG")
            src = base64.b64encode(buf.getvalue()).decode()
            cap = (f"true: {html.escape(it['true'])}<br>predicted: {html.escape(it['predicted'])} {it['probability']:.2f}"
                   + (f"<br><small>{html.escape(Path(it['path']).name)}</small>" if it.get("path") else ""))
            out.append(f"<figure><img alt='' src='data:image/png;base64,{src}'><figcaption>{cap}</figcaption></figure>")
        return "<div class='cams'>" + "".join(out) + "</div>"

    parts = [head, "<style>.cams{display:flex;flex-wrap:wrap;gap:.8em}.cams figure{margin:0;width:160px}"
             ".cams figcaption{font-size:.85em}</style>",
             f"<p>{'Grad-CAM (Selvaraju et al. 2017)' if section['method'] == 'gradcam' else html.escape(section['method'])}"
             f" heatmaps of the predicted class at layer <code>{html.escape(str(section['layer']))}</code>, the last "
             "spatial feature map: red is where the decision draws most on; computed in "
             f"{section.get('seconds', 0):.1f} s. <code>fovea explain RUN IMAGE --check</code> explains any image "
             "and tests the maps against randomized weights.</p>"]
    if section["correct"]:
        parts.append("<h3>Correctly classified (a sample)</h3>" + figures(section["correct"]))
    if section["wrong"]:
        parts.append("<h3>Most confidently wrong (highest loss)</h3>" + figures(section["wrong"]))
    else:
        parts.append("<p>No validation image was misclassified.</p>")
    return "".join(parts)


def _unknown_html(u: dict[str, Any]) -> str:
    """Images of none of the classes: the known images kept and their accuracy, each unknown set's ROC-AUC and
    share accepted, and both score distributions against the threshold (training's entry: the calibration)."""
    if "known" not in u:  # training: what the score is and what its threshold keeps
        if "skipped" in u:
            return f"<h2>Images of none of the classes</h2><p>No unknown score: {html.escape(str(u['skipped']))}.</p>"
        return (f"<h2>Images of none of the classes</h2><p>An image whose <code>{html.escape(str(u['score']))}</code> "
                f"score is over {u['threshold']:.4g} is answered <b>unknown</b>: the threshold keeps "
                f"{u['kept']:.1%} of the {u['calibrated_on']} validation images (asked {u['keep']:.0%}). "
                "How well it tells other images apart: <code>fovea evaluate RUN DATA --unknown FOLDER</code>.</p>")
    k = u["known"]
    parts = [f"<h2>Images of none of the classes</h2><p>Score <code>{html.escape(str(u.get('score')))}</code>, "
             f"threshold {u['threshold']:.4g} (calibrated to keep {u['keep']:.0%} of known images). Of these "
             f"{k['n']} known images it keeps {format_cell(k['kept'])}; their accuracy "
             f"{format_cell(k['accuracy_kept'])} against {format_cell(k['accuracy_all'])} over all of them.</p>"]
    if u.get("unknown"):
        rows = [[name, v["n"], v["auroc"], v["accepted"]] for name, v in u["unknown"].items()]
        parts.append(table_html(rows, ["images of none of the classes", "n", "ROC-AUC (known vs these)",
                                       "accepted as a class"]))
    scores = u.get("scores")
    if scores:
        import matplotlib.pyplot as plt
        import numpy as np

        fig, ax = plt.subplots(figsize=(7, 3.2))
        everything = np.concatenate([np.asarray(v) for v in scores.values() if len(v)])
        bins = np.linspace(float(everything.min()), float(everything.max()) + 1e-9, 40)
        for name, v in scores.items():
            ax.hist(np.asarray(v), bins.tolist(), density=True, alpha=0.5, label=Path(name).name or name)
        ax.axvline(u["threshold"], color="black", ls="--", lw=1, label="threshold")
        ax.set(xlabel="unknown score (higher: less like the classes)", ylabel="density")
        ax.legend(fontsize=8)
        parts.append(figure_html(fig))
    return "".join(parts)


def write_report(path: str | Path, *, title: str, meta: dict[str, Any] | None, metrics: dict[str, Any],
                 history: list[dict[str, Any]] | None = None, quarantined: list[dict[str, str]] | None = None,
                 explanations: dict[str, Any] | None = None) -> Path:
    """Write report.html; every plot is embedded, so the file can be mailed or archived alone."""
    import matplotlib

    matplotlib.use("Agg")
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    keys = ["accuracy", "accuracy_95ci", "balanced_accuracy", "f1_macro", "roc_auc", "log_loss", "n_images", "skipped",
            "n_train", "n_val", "best_epoch", "epochs_run", "train_seconds"]
    parts.append("<h2>Summary</h2>" + table_html([[k, metrics[k]] for k in keys if k in metrics], ["metric", "value"]))
    if "best_epoch" in metrics:
        parts.append("<p class='note'>The best epoch was picked on this validation set, so its figures lean "
                     "slightly optimistic; a test split the run never saw (<code>fovea evaluate RUN DATA/test</code>) "
                     "gives the unbiased estimate.</p>")
    if metrics.get("diagnosis"):
        parts.append(_diagnosis_html(metrics["diagnosis"]))
    if meta and meta.get("transfer", {}).get("mode") not in (None, "scratch"):
        parts.append(_transfer_html(meta["transfer"]))
    if meta and meta.get("transfer", {}).get("classical"):
        parts.append(_classical_html(meta["transfer"]["classical"]))
    if history:
        parts.append("<h2>Learning curves</h2>" + learning_curves(history))
        norms = [h["grad_norm"] for h in history if h.get("grad_norm") is not None]
        if norms:
            clip = ((meta or {}).get("training") or {}).get("clip_grad")
            largest = max((h.get("grad_norm_max", float("nan")) for h in history), key=lambda v: (v == v, v))
            parts.append(f"<p>Gradient norm (L2 over all parameters, before "
                         f"{f'clipping at --clip-grad {clip:g}' if clip else 'any clipping: --clip-grad was not set'}"
                         f"): mean {format_cell(norms[0])} in the first epoch, {format_cell(norms[-1])} in the last, "
                         f"largest step {format_cell(largest)}. A norm falling towards 0 while the loss stays high "
                         f"means vanishing gradients; one jumping by orders of magnitude, or NaN, exploding ones.</p>")
    classes = metrics.get("classes", [])
    if metrics.get("confusion_matrix"):
        parts.append("<h2>Confusion matrix</h2>" + confusion_plot(metrics["confusion_matrix"], classes))
    if metrics.get("per_class"):
        rows = [[c, v["precision"], v["recall"], v["f1"], v["support"]] for c, v in metrics["per_class"].items()]
        parts.append("<h2>Per class</h2>" + table_html(rows, ["class", "precision", "recall", "F1", "support"]))
    if metrics.get("roc_curves"):
        parts.append(f"<h2>ROC curves</h2><p>ROC-AUC: {format_cell(metrics.get('roc_auc'))}</p>" + roc_plot(metrics["roc_curves"]))
    if metrics.get("unknown"):
        parts.append(_unknown_html(metrics["unknown"]))
    if explanations is not None:
        parts.append(_looks_at_html(explanations))
    q = quarantined or []
    parts.append(f"<h2>Files not used ({len(q)})</h2>")
    if q:
        parts.append("<p class='warn'>These files could not be decoded and were left out:</p>"
                     + table_html([[x.get("split", ""), x["path"], x["reason"]] for x in q], ["split", "file", "reason"]))
    else:
        parts.append("<p>Every file was used.</p>")
    if meta:
        shown = {k: meta[k] for k in ("architecture", "preprocessing", "training", "data", "versions") if k in meta}
        parts.append("<h2>Model</h2><pre>" + html.escape(json.dumps(shown, indent=2, default=str)) + "</pre>")
    path = Path(path)
    path.write_text("\n".join(parts))
    return path
