"""Watching a deployed model: `fovea drift`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fovea.cli import _render as render
from fovea.cli._common import DbOption, JsonOption, app, echo_json, examples


@app.command("drift", epilog=examples(
    "fovea drift --model pets                      # the newest 500 answers of pets's production version",
    "fovea drift --model pets:3 --since 1h --report drift.html --webhook https://hooks.example/fovea",
    "fovea drift --model runs/pets --data uploads/2026-11-23/",
    "fovea drift --model runs/old --build-reference data/pets/val"))
def drift_command(
    model: Annotated[str, typer.Option(help="A registry reference (NAME, NAME:VERSION, NAME:ALIAS) or a model folder.")],
    window: Annotated[int, typer.Option(min=1, help="The newest N answers in the store form the window.")] = 500,
    since: Annotated[str | None, typer.Option(help="Instead: every answer of the last 30m, 6h, ...")] = None,
    data: Annotated[Path | None, typer.Option(help="Instead of the store: a folder of images to test.")] = None,
    alpha: Annotated[float, typer.Option(help="Significance level of the whole check (families corrected).")] = 0.05,
    permutations: Annotated[int, typer.Option(min=1, help="Permutations of the MMD test.")] = 1000,
    report: Annotated[Path | None, typer.Option(help="Write the HTML report here.")] = None,
    webhook: Annotated[str | None, typer.Option(help="POST the result as JSON here when drift is found.")] = None,
    fail_on_drift: Annotated[bool, typer.Option("--fail-on-drift", help="Exit 3 when drift is found (for cron).")] = False,
    build_reference: Annotated[Path | None, typer.Option(help="Save a reference for a model folder that has none, "
                                                               "from these validation images (CLASS/* folders).")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Is recent traffic still like the data the model was validated on? And, with feedback, is it still right?

    Tests a window (from the store, or --data) against the reference saved at training: MMD and per-component
    KS on penultimate-layer embeddings, KS on image statistics, chi-square on predicted labels, KS on
    confidence; with feedback, accuracy and calibration against validation.
    """
    from datetime import timedelta

    from fovea import monitor
    from fovea._duration import parse_duration

    if build_reference is not None:
        out, n, bad = monitor.reference_from_folder(model, build_reference, db=db)
        typer.echo(f"reference of {n} images saved: {out}" + (f" ({bad} unreadable)" if bad else ""))
        return
    since_span = timedelta(seconds=parse_duration(since)) if since else None
    result = monitor.run_drift(model, db=db, data=data, window=window, since=since_span, alpha=alpha,
                                 permutations=permutations, webhook=webhook, report=report)
    if as_json:
        echo_json(result.to_dict(), default=float)
    else:
        render.drift(result, alpha, report)
    if fail_on_drift and result.alert:
        raise typer.Exit(3)
