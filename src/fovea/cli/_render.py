"""How results look in a terminal: every command's tables and lines, shared where commands show the same thing.

Results go to stdout (``typer.echo`` for lines, rich tables through ``console()``); logs and progress to stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer


def console(whole_lines: bool = False) -> Any:
    """A rich console on stdout; ``whole_lines``: when piped, nothing folded (paths and tables stay greppable)."""
    from rich.console import Console

    return Console() if not whole_lines or sys.stdout.isatty() else Console(width=10_000)


def _f4(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


# --- data ---------------------------------------------------------------------------------------------------


def label_issues(r: dict[str, Any], top: int) -> None:
    """``fovea check --labels``: the suspects, most likely wrong first, and where the whole result is."""
    from rich.markup import escape
    from rich.table import Table

    con = console()
    root = Path(r["data"])
    con.print(f"[bold]{escape(r['data'])}[/]: {r['n_issues']} of {r['n_images']} images have a label confident "
              f"learning doubts ({r['folds']} folds, out-of-fold accuracy {100 * r['out_of_fold_accuracy']:.1f} %, "
              f"{r['seconds']:.0f} s)")
    shown = [x for x in r["images"] if x["issue"]][:top]
    if shown:
        t = Table("rank", "image", "given", "suggested", "score", "split", title=f"the {len(shown)} most likely wrong "
                  "(score: out-of-fold probability of the given label)")
        for x in shown:
            p = Path(x["path"])
            t.add_row(str(x["rank"]), escape(p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)),
                      escape(x["given"]), escape(x["suggested"]), f"{x['quality']:.3f}", x["split"])
        con.print(t)
    if r.get("quarantined"):
        con.print(f"{r['quarantined']} unreadable image(s) left out (fovea check DATA lists them)")
    if "queued" in r:
        con.print(f"{r['queued']} sent to the review queue (the others were queued before)")
    con.print(f"thumbnails: {r['html']}\nall images, JSON: {r['file']}")
    con.print("next: confirm or relabel them in the review queue (fovea serve, Review page); fovea train applies the "
              "verdicts without touching your folders")


def check_report(r: dict[str, Any]) -> None:
    """``fovea check``: counts, imbalance, sizes, unusable files, duplicates and leakage, and what to do."""
    from rich.markup import escape
    from rich.table import Table

    con = console()
    con.print(f"[bold]{r['data']}[/] ({r['layout']} layout): {r['files']} files, {r['usable']} usable, "
              f"{len(r['classes'])} classes")
    t = Table("split", *r["classes"], "total", "imbalance")
    for split, counts in r["usable_counts"].items():
        t.add_row(split, *[str(counts[c]) for c in r["classes"]], str(sum(counts.values())), f"{r['imbalance'].get(split, 0):.2f}:1")
    con.print(t)
    s = r["sizes"]
    if s:
        con.print(f"sizes: min {s['min'][0]}x{s['min'][1]}, median {s['median'][0]}x{s['median'][1]}, "
                  f"max {s['max'][0]}x{s['max'][1]} ({s['distinct']} distinct); modes {r['modes']}; formats {r['formats']}")
    if r["quarantined"]:
        q = Table("split", "file", "reason", title=f"{len(r['quarantined'])} unusable file(s)")
        for x in r["quarantined"]:
            q.add_row(x["split"], escape(x["path"].replace("\n", "\\n")), escape(x["reason"]))
        con.print(q)
    root = Path(r["data"]).parent if Path(r["data"]).is_file() else Path(r["data"])

    def shown(f: dict[str, Any]) -> str:  # the path under the data root: subfolders tell copies apart
        p = Path(f["path"])
        return escape(p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p))

    for kind in ("exact_duplicates", "near_duplicates"):
        groups = r[kind]
        if groups:
            con.print(f"[bold]{len(groups)} {kind.replace('_', ' ')}[/] group(s)"
                      f" ({sum(g['cross_split'] for g in groups)} across splits):")
            for g in groups[:10]:
                tag = " [red]LEAK[/]" if g["cross_split"] else ""
                con.print("  " + " = ".join(shown(f) for f in g["files"]) + tag, highlight=False)
            if len(groups) > 10:
                con.print(f"  … {len(groups) - 10} more (see --json)")
    con.print("[bold]What to do[/]")
    for tip in r["advice"]:
        con.print(f"  • {tip}")


def summary_table(summary: Any, depth: int | None = None) -> None:
    """``fovea summary``: the layer table with a totals footer, then the model's totals in one line."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    title = (f"{escape(summary.model)}: {summary.image_size}x{summary.image_size} px"
             + (f", {summary.num_classes} classes" if summary.num_classes else ""))
    t = Table(title=title, caption=summary.notes, caption_justify="left", box=box.SIMPLE_HEAD, show_footer=True)
    columns: list[tuple[str, dict[str, Any]]] = [
        ("layer", {"overflow": "fold"}), ("type", {"overflow": "fold"}), ("output shape", {"no_wrap": True}),
        ("params", {"justify": "right", "no_wrap": True}), ("FLOPs", {"justify": "right", "no_wrap": True})]
    for (name, style), foot in zip(columns, summary.footer()):
        t.add_column(name, footer=foot, **style)
    for row in summary.cells(depth):
        t.add_row(*(escape(c) for c in row))
    con = console(whole_lines=True)
    con.print(t)
    s = summary
    flops = f"{s.flops / 1e9:,.2f} GFLOPs" if s.flops >= 1e9 else f"{s.flops / 1e6:,.1f} MFLOPs"
    con.print(f"parameters {s.parameters:,} ({s.trainable_parameters:,} trainable, {s.param_bytes / 1e6:,.2f} MB); "
              f"{flops} per image at {s.image_size}x{s.image_size} px", highlight=False)
    if s.formulas:
        con.print("[bold]The course's formulas[/] (d: inputs per step, h: hidden units)")
        for line in s.formulas:
            con.print(f"  {escape(line)}", highlight=False)


# --- training -----------------------------------------------------------------------------------------------


def train_result(r: dict[str, Any]) -> None:
    """What ``fovea train`` ends with (``fovea.training.run_result``): the folds, the ensemble or the run."""
    from fovea.evaluation import format_diagnosis

    run = r["run"]
    if r["kind"] == "cv":
        acc = r["summary"]["accuracy"]
        typer.echo(r["table"])
        typer.echo(f"{r['k']}-fold cross-validation: accuracy {acc['mean']:.4f} ± {acc['std']:.4f} "
                   f"(sample std over folds)\nruns: {run}/fold-*")
        return
    m = r["metrics"]
    auc = f"{m['roc_auc']:.4f}" if m.get("roc_auc") is not None else "n/a"
    if r["kind"] == "ensemble":
        for row in m["members"]:
            typer.echo(f"member {Path(row['run']).name}: val accuracy {row['accuracy']:.4f}")
        typer.echo(f"ensemble of {len(m['members'])}: val accuracy {m['accuracy']:.4f}  balanced "
                   f"{m['balanced_accuracy']:.4f}  ROC-AUC {auc}  ({m['n_val']} images)")
        typer.echo(f"ensemble model: {run}  (fovea predict {run} IMAGE)")
        return
    if r.get("auto"):
        typer.echo(f"--mode auto chose {r['mode']}: {r['auto']['why']}")
    typer.echo(f"val accuracy {m['accuracy']:.4f}  balanced {m['balanced_accuracy']:.4f}  ROC-AUC {auc}  "
               f"({m['n_val']} images, {m['skipped']} skipped)")
    if m.get("diagnosis"):
        typer.echo(format_diagnosis(m["diagnosis"]))
    typer.echo(f"run folder: {run}\nreport:     {r['report']}")


def compare_table(rows: list[dict[str, Any]], *, title: str, width: int) -> Any:
    """The table for a terminal ``width`` columns wide: a row per model, or, where that does not fit, a column
    per model (the 11 columns need ~110 characters; folding them into 80 made every number unreadable)."""
    from rich import box
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    from fovea.compare import NOTES, table

    headers, cells = table(rows)
    style: dict[str, Any] = {"title": title, "caption": NOTES, "caption_justify": "left", "box": box.SIMPLE_HEAD}
    wide = Table(**style)
    for i, h in enumerate(headers):
        wide.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for c in cells:
        wide.add_row(*c)
    unbounded = Console(width=10_000)
    if Measurement.get(unbounded, unbounded.options, wide).maximum <= width:
        return wide
    tall = Table(**style)
    tall.add_column(headers[0])
    for c in cells:
        tall.add_column(c[0], justify="right", overflow="fold")
    for j, h in enumerate(headers[1:], 1):
        tall.add_row(h, *(c[j] for c in cells))
    return tall


def ensemble_table(metrics: dict[str, Any]) -> Any:
    """``fovea ensemble --data``: one row per member, then the ensemble."""
    from rich.table import Table

    t = Table("model", "size", "accuracy", "balanced accuracy", "ROC-AUC", "log loss",
              title=f"{metrics.get('n_images', '?')} images ({metrics.get('split', '?')} split)")
    for r in metrics.get("members", []):
        t.add_row(Path(r["run"]).name, str(r["image_size"]), _f4(r["accuracy"]), _f4(r["balanced_accuracy"]),
                  _f4(r["roc_auc"]), _f4(r.get("log_loss")))
    t.add_row("ensemble", "", _f4(metrics.get("accuracy")), _f4(metrics.get("balanced_accuracy")),
              _f4(metrics.get("roc_auc")), _f4(metrics.get("log_loss")), style="bold")
    return t


def lr_find_result(r: Any) -> None:
    stop = (f"stopped at LR {r.diverged_lr:.3g}, where the smoothed loss passed 4x its minimum"
            if r.diverged_lr is not None else f"no blow-up up to LR {r.lrs[-1]:.3g} ({len(r.lrs)} steps)")
    typer.echo(f"suggested --lr {r.suggestion:.3g}  ({r.rule})\n"
               f"  smoothed loss lowest at LR {r.min_loss_lr:.3g} (a tenth of it, more cautious: "
               f"{r.min_loss_lr / 10:.3g}); {stop}\n"
               f"  fovea train's own default here: {r.default_lr:.3g}\n"
               f"curve: {r.out / 'lr_find.png'}, {r.out / 'lr_find.csv'}  ({r.seconds:.1f} s)\n"
               f"use it: {r.command()}")


# --- using a model ------------------------------------------------------------------------------------------


def evaluation(m: dict[str, Any]) -> None:
    """``fovea evaluate``: the headline figures, per-class precision/recall/F1, the confusion matrix."""
    from rich.table import Table

    from fovea.evaluation import format_diagnosis

    con = console()
    auc = f"{m['roc_auc']:.4f}" if m["roc_auc"] is not None else "n/a (a class is missing)"
    con.print(f"[bold]{m['n_images']}[/] images ({m['split']} split), {m['skipped']} skipped")
    con.print(f"accuracy {m['accuracy']:.4f}   balanced accuracy {m['balanced_accuracy']:.4f}   "
              f"macro F1 {m['f1_macro']:.4f}   ROC-AUC {auc}")
    t = Table("class", "precision", "recall", "F1", "support")
    for c, v in m["per_class"].items():
        t.add_row(c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(v["support"]))
    con.print(t)
    cm = Table("true \\ predicted", *m["classes"])
    for c, row in zip(m["classes"], m["confusion_matrix"]):
        cm.add_row(c, *map(str, row))
    con.print(cm)
    for q in m["quarantined"]:
        con.print(f"[yellow]skipped[/] {q['path']}: {q['reason']}")
    if m.get("diagnosis"):
        con.print(format_diagnosis(m["diagnosis"]), markup=False)
    if m.get("unknown"):
        unknown_figures(m["unknown"])


def unknown_figures(u: dict[str, Any]) -> None:
    """How a model that answers "unknown" did: the known images it kept, and each set of images of none of its
    classes (ROC-AUC, share accepted)."""
    from rich.markup import escape
    from rich.table import Table

    con = console(whole_lines=True)
    k = u["known"]
    con.print(f"unknown images: score {u.get('score')}, threshold {u['threshold']:.4g} (calibrated to keep "
              f"{u['keep']:.0%}); kept {k['n']} known images x {_f4(k['kept'])}, their accuracy {_f4(k['accuracy_kept'])} "
              f"(all: {_f4(k['accuracy_all'])})", highlight=False)
    if u.get("unknown"):
        t = Table("images of none of the classes", "n", "ROC-AUC", "accepted as a class")
        for name, v in u["unknown"].items():
            t.add_row(escape(name), str(v["n"]), _f4(v["auroc"]), _f4(v["accepted"]))
        con.print(t)


def explained(o: Any, method: str, check: Any) -> None:
    """``fovea explain``: each image's overlay, and the randomization check's cascade and verdict."""
    from rich.markup import escape
    from rich.table import Table

    con = console(whole_lines=True)
    t = Table("image", "predicted", "explained", "file", title=f"{method} at layer {escape(o.layer)}")
    for r in o.rows:
        t.add_row(escape(r["path"]), f"{escape(r['predicted'])} {r['probability']:.3f}", escape(r["explained"]),
                  escape(r["file"]))
    con.print(t)
    for path, reason in o.skipped:
        con.print(f"[yellow]skipped[/] {escape(path)}: {escape(reason)}", highlight=False)
    if check is None:
        return
    st = Table("step", "randomized (cumulative, from the output)", "mean |Spearman|", "mean SSIM",
               title=f"randomization check on {check.n_images} images")
    for k, s in enumerate(check.steps):
        mark = "  <- verdict" if k == check.midpoint else ""
        st.add_row(str(k + 1), escape(s.randomized), f"{s.spearman:.3f}{mark}", f"{s.ssim:.3f}")
    con.print(st)
    d = check.decisive
    verdict = ("PASSES: its maps change when the model's weights do" if check.passed else
               "FAILS: its maps barely change when the model's weights are destroyed, so they do not explain the model")
    con.print(f"{method} {verdict} (mean |Spearman| {d.spearman:.3f} at step {check.midpoint + 1} of "
              f"{len(check.steps)}, threshold {check.threshold}; {check.steps[-1].spearman:.3f} with every "
              f"layer randomized; {check.seconds:.1f} s)", highlight=False)


def similar(found: Any) -> None:
    """``fovea similar``: per query image, its neighbours (rank, path under the gallery's root, label, distance)."""
    from rich.markup import escape
    from rich.table import Table

    con = console(whole_lines=True)
    g = found.gallery
    con.print(f"gallery: {escape(g.root or '')}, {len(g)} images ({'ivf index' if g.indexed else 'exact search'}"
              + (f"; {len(g.skipped)} unreadable files left out" if g.skipped else "") + ")", highlight=False)
    for query, hits in found.queries:
        t = Table("rank", "path", "label", "distance", title=escape(query), title_justify="left")
        for rank, h in enumerate(hits, 1):
            t.add_row(str(rank), escape(g.shown(h.path)), escape(h.label or "-"), f"{h.distance:.4f}")
        con.print(t)
    for path, reason in found.skipped:
        con.print(f"[yellow]skipped[/] {escape(path)}: {escape(reason)}", highlight=False)


def compression(run: Path, result: dict[str, Any]) -> None:
    """``fovea compress``: the table, each row's verdict, the machine and where the report is."""
    from rich.table import Table

    from fovea.compress import SHORT_COLUMNS, table_rows

    table = Table(title=f"{run} on {result['images']} images from {result['data']}")
    for h in SHORT_COLUMNS:
        table.add_column(h, overflow="fold")
    rows = table_rows(result)
    for cells in rows:
        table.add_row(*cells[:-1])
    con = console()
    con.print(table)
    for cells in rows:
        con.print(f"{cells[0]}: {cells[-1]}", markup=False)
    con.print(f"machine: {result['hardware_summary']}", markup=False)
    if not result["hardware"]["native_int8"]:
        con.print("this CPU has no VNNI/AMX int8 instructions: int8 will not be faster than float32 here", markup=False)
    con.print(f"report: {result['report']}", markup=False)


# --- registry and roll-outs ---------------------------------------------------------------------------------


def versions(vs: list[Any]) -> None:
    from rich.table import Table

    table = Table()
    for h in ("model", "version", "aliases", "runtime", "classes", "size", "accuracy", "created", "from"):
        table.add_column(h, overflow="fold")
    for v in vs:
        table.add_row(v.name, str(v.version), ",".join(v.aliases), v.runtime, ",".join(v.classes), str(v.image_size),
                      "—" if v.accuracy is None else f"{v.accuracy:.3f}", v.created, v.source)
    console().print(table)


def deployments(rows: list[dict[str, Any]], where: str) -> None:
    """``fovea deployments``: state, share and a running candidate's figures against production."""
    from rich.table import Table

    if not rows:
        typer.echo("no deployments yet; start one: fovea deploy NAME:VERSION --strategy canary")
        return
    table = Table(title=f"deployments in {where}")
    for h in ("#", "model", "strategy", "state", "candidate", "production", "share", "candidate figures", "why"):
        table.add_column(h, overflow="fold")
    for d in rows:
        f = d.get("figures") or {}
        c = f.get("candidate") or {}
        figures = "—"
        if c:
            agree = "—" if f.get("agreement") is None else f"{f['agreement']:.1%}"
            p95 = "—" if c.get("p95_ms") is None else f"{c['p95_ms']:.1f} ms"
            conf = "—" if c.get("mean_confidence") is None else f"{c['mean_confidence']:.3f}"
            figures = f"n={c['n']} errors={c['errors']} agree={agree} p95={p95} conf={conf}"
        share = {"shadow": "copy of 100 %", "canary": f"{d['percent']:g} %", "blue-green": "switch"}[d["strategy"]]
        table.add_row(str(d["id"]), d["name"], d["strategy"], d["state"], d["candidate"] or "—", d["production"],
                      share if d["state"] == "running" else "—", figures, d["reason"] or "")
    console().print(table)


def drift(result: Any, alpha: float, report: Path | None) -> None:
    """``fovea drift``: the verdict, then each family's p-value (flagged under ``alpha``) or why it did not run."""
    typer.echo(result.summary())
    for t in result.drift.tests:
        mark = "  <- drift" if t.p_value < alpha else ""
        typer.echo(f"  {t.family:14} p = {t.p_value:.3g}{mark}")
    for fam, why in result.drift.skipped.items():
        typer.echo(f"  {fam:14} not run: {why}")
    if report is not None:
        typer.echo(f"report: {report}")


def ops_table(ops: list[Any]) -> None:
    """``fovea ops list``: every operation, its parameters and defaults, and whether it can be a --preprocess step."""
    from rich.table import Table

    t = Table("operation", "kind", "parameters (defaults)", "what it does", "step")
    for o in ops:
        t.add_row(o.name, o.kind, o.signature(), o.help, "yes" if o.preprocess else "")
    from rich.console import Console

    (console() if sys.stdout.isatty() else Console(width=200)).print(t)
    typer.echo("step: usable in `fovea train --preprocess` (steps run after the resize; a gray result gets 3 equal channels)")



def console_stderr() -> Any:
    """Progress notes beside a result: on stderr, so --json on stdout stays parseable."""
    from rich.console import Console

    return Console(stderr=True)
