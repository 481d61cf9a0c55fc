"""Model versions and roll-outs: `fovea registry add|list|show|alias`, `deploy`, `rollback`, `deployments`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fovea.cli import _render as render
from fovea.cli._common import DbOption, JsonOption, app, echo_json, examples
from fovea.errors import FoveaError

registry_app = typer.Typer(help="Model versions and aliases (stored in FOVEA_HOME, or the database at --db).",
                           no_args_is_help=True, rich_markup_mode="markdown")
app.add_typer(registry_app, name="registry")


@registry_app.command("add", epilog=examples("fovea registry add runs/pets --name pets",
                                             "fovea registry add runs/pets/compressed/ort-int8-entropy --name pets "
                                             "--alias candidate"))
def registry_add(
    run: Annotated[Path, typer.Argument(help="A model folder: a run, a compressed artifact, an ensemble.")],
    name: Annotated[str, typer.Option(help="The model's name; each add makes its next version.")],
    alias: Annotated[str | None, typer.Option(help="Point this alias (e.g. production) at the new version.")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register a model: its files are copied into FOVEA_HOME/models/NAME/VERSION."""
    from fovea import model_registry
    from fovea.store import Store

    v = model_registry.add(run, name, alias=alias, store=Store(db))
    if as_json:
        echo_json(v.to_dict())
    else:
        typer.echo(f"registered {v.ref}" + (f" ({', '.join(v.aliases)})" if v.aliases else "") + f" at {v.path}")


@registry_app.command("list", epilog=examples("fovea registry list", "fovea registry list --name pets --json"))
def registry_list(
    name: Annotated[str | None, typer.Option(help="Only this model's versions.")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Every registered version, with its aliases."""
    from fovea import model_registry
    from fovea.store import Store

    vs = model_registry.versions(name, store=Store(db))
    if as_json:
        echo_json([v.to_dict() for v in vs])
    else:
        render.versions(vs)


@registry_app.command("show", epilog=examples("fovea registry show pets", "fovea registry show pets:2",
                                              "fovea registry show pets:production --json"))
def registry_show(
    ref: Annotated[str, typer.Argument(help="NAME (production, else newest), NAME:VERSION or NAME:ALIAS.")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """One version: where it is, where it came from, its digest and aliases."""
    from fovea import model_registry
    from fovea.store import Store

    v = model_registry.resolve(ref, store=Store(db))
    if as_json:
        echo_json(v.to_dict())
        return
    for k, val in v.to_dict().items():
        typer.echo(f"{k:11} {', '.join(val) if isinstance(val, list) else val}")


@registry_app.command("alias", epilog=examples("fovea registry alias pets:3 production",
                                               "fovea registry alias pets:4 candidate"))
def registry_alias(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    alias: Annotated[str, typer.Argument(help="e.g. production, candidate")],
    db: DbOption = None,
) -> None:
    """Point an alias at a version (moving it from where it pointed)."""
    from fovea import model_registry
    from fovea.store import Store

    name, _, version = ref.partition(":")
    if not version.isdigit():
        raise FoveaError(f"give NAME:VERSION (e.g. pets:3), not {ref!r}")
    v = model_registry.set_alias(name, int(version), alias, store=Store(db))
    typer.echo(f"{name}:{alias} -> {v.ref}")


@app.command("deploy", epilog=examples(
    "fovea deploy pets:2 --strategy shadow",
    "fovea deploy pets:2 --strategy canary --percent 10 --steps 10,25,50,100 --interval 10m",
    "fovea deploy pets:2 --strategy canary --min-agreement 0.95 --max-p95-ratio 1.2",
    "fovea deploy pets:2 --strategy blue-green"))
def deploy_command(
    ref: Annotated[str, typer.Argument(help="The candidate: NAME:VERSION or NAME:ALIAS of a registered model.")],
    strategy: Annotated[str, typer.Option(help="shadow | canary | blue-green")],
    percent: Annotated[float | None, typer.Option(help="canary: the first step's share of requests.")] = None,
    steps: Annotated[str | None, typer.Option(help="canary: every step's share, rising to 100, e.g. 10,25,50,100.")] = None,
    interval: Annotated[str, typer.Option(help="canary: how long each healthy step lasts (30s, 10m, 1h).")] = "10m",
    max_error_rate: Annotated[float, typer.Option(help="Roll back when the candidate fails on more of its inputs.")] = 0.02,
    max_p95_ratio: Annotated[float, typer.Option(help="... or its p95 latency exceeds this many times production's.")] = 1.5,
    max_confidence_drop: Annotated[float, typer.Option(help="... or its mean confidence is this far below production's.")] = 0.10,
    min_agreement: Annotated[float, typer.Option(help="... or it gives production's label to fewer of the same inputs.")] = 0.90,
    min_samples: Annotated[int, typer.Option(help="Candidate answers needed before judging or stepping.")] = 50,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Roll out a new version beside production: every `fovea serve NAME` replica follows within seconds.

    shadow: the candidate answers a copy of every request, users get production's answers; compare with
    `fovea deployments`. canary: it answers a growing share (sticky per X-Client-Id), stepping after each
    healthy interval and rolled back automatically on a regression. blue-green: loaded and warmed beside
    production, then switched at once; `fovea rollback` switches back.
    """
    from fovea import deploy
    from fovea.store import Store

    try:
        plan = [float(p) for p in steps.split(",")] if steps else None
    except ValueError:
        raise FoveaError(f"--steps {steps!r}: give percentages separated by commas, e.g. 10,25,50,100") from None
    d = deploy.start(ref, strategy, percent=percent, steps=plan, interval_s=deploy.parse_duration(interval),
                     thresholds={"max_error_rate": max_error_rate, "max_p95_ratio": max_p95_ratio,
                                 "max_confidence_drop": max_confidence_drop, "min_agreement": min_agreement,
                                 "min_samples": min_samples}, store=Store(db))
    if as_json:
        echo_json(d.to_dict())
        return
    typer.echo(f"deployment #{d.id}: {d.events[-1]['message'] if d.events else d.strategy}")
    if d.strategy == "canary":
        typer.echo(f"steps {', '.join(f'{p:g}' for p in d.steps)} % every {d.interval_s:g} s while healthy")
    typer.echo(f"servers following {d.name} pick it up within seconds; watch it: fovea deployments {d.name}")


@app.command("rollback", epilog=examples("fovea rollback pets", "fovea rollback pets --reason 'complaints about dogs'"))
def rollback_command(
    name: Annotated[str, typer.Argument(help="The model's name.")],
    reason: Annotated[str, typer.Option(help="Recorded with the rollback.")] = "rolled back by hand",
    db: DbOption = None,
) -> None:
    """End the running deployment (production unchanged), or undo the last promotion."""
    from fovea import deploy
    from fovea.store import Store

    store = Store(db)
    d = deploy.rollback(name, reason=reason, store=store)
    typer.echo(f"deployment #{d.id} ({d.strategy} of {d.candidate.ref if d.candidate else '?'}): {d.state}; "
               f"production is {deploy.production(name, store).ref}")


@app.command("deployments", epilog=examples("fovea deployments", "fovea deployments pets --json"))
def deployments_command(
    name: Annotated[str | None, typer.Argument(help="Only this model's deployments.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Deployments, newest first: state, traffic share, and the running one's figures against production."""
    from fovea import deploy
    from fovea.store import Store

    store = Store(db)
    rows = deploy.overview(name, store=store, limit=limit)
    if as_json:
        echo_json({"deployments": rows})
    else:
        render.deployments(rows, store.safe_url)
