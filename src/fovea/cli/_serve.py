"""Serving a model: `fovea serve` (online), `fovea batch` (a folder or CSV into the store)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fovea.cli._common import (
    DbOption,
    DeviceOption,
    JsonOption,
    ModelRefArg,
    NoUnknownOption,
    app,
    echo_json,
    examples,
    setup_logging,
)
from fovea.errors import FoveaError


@app.command("serve", epilog=examples(
    "fovea serve runs/pets",
    "fovea serve pets:production --port 8080 --workers 2",
    "FOVEA_ADMIN_TOKEN=$(openssl rand -hex 16) fovea serve pets --db postgresql://fovea@db/fovea",
    "curl -s --data-binary @cat.jpg 'localhost:8000/v1/predict?explain=gradcam'",
    "fovea serve pets --review-below 0.8 --consensus 2     # unsure uploads to the review queue; 2 must agree",
    "curl -s --data-binary @cat.jpg -H 'Content-Type: image/jpeg' localhost:8000/v1/predict",
    "curl -s -F file=@cat.jpg -F file=@dog.png localhost:8000/v1/predict",
    "fovea serve pets --body-timeout 60     # slow uplinks: a minute to send each body"))
def serve_command(
    model: ModelRefArg,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes; each loads the model.")] = 1,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass at most.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long a request may wait for others to join its batch "
                                                    "(0: only those already queued).")] = 0.0,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body, in MiB.")] = 20.0,
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds before a request is answered 504.")] = 30.0,
    body_timeout: Annotated[float, typer.Option(min=0.001, help="Seconds a client has to send its whole request body "
                                                     "before it is answered 408 (slow or stalled uploads).")] = 30.0,
    device: DeviceOption = "auto",
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not record predictions in the store.")] = False,
    hybrid: Annotated[bool, typer.Option("--hybrid", help="Answer from predictions `fovea batch` stored for the same "
                                                          "image bytes and model version; infer the rest.")] = False,
    db: DbOption = None,
    admin_token: Annotated[str | None, typer.Option(envvar="FOVEA_ADMIN_TOKEN", help="Enables /v1/admin/* (deploy, "
                                                   "rollback) for 'Authorization: Bearer TOKEN'.")] = None,
    poll: Annotated[float, typer.Option(help="Seconds between looks at the store (production alias, deployments, "
                                             "canary steps).")] = 2.0,
    drift_every: Annotated[str, typer.Option(help="How often to test the newest answers for drift (10m; 0: never). "
                                                  "Results: /metrics, the log, FOVEA_HOME/drift/.")] = "10m",
    drift_window: Annotated[int, typer.Option(min=1, help="How many of the newest answers each drift check tests.")] = 500,
    drift_webhook: Annotated[str | None, typer.Option(help="POST each drift alert as JSON to this URL.")] = None,
    review_below: Annotated[float, typer.Option(help="Queue answers less confident than this for people to label "
                                                     "(the web app's review page; 0: none).")] = 0.0,
    consensus: Annotated[int, typer.Option(help="Reviewers who must agree before a queued image is labelled.")] = 1,
    no_unknown: NoUnknownOption = False,
) -> None:
    """Serve a model over HTTP: /v1/predict, Open Inference Protocol v2 under /v2, Prometheus /metrics.

    Served by registry name (NAME or NAME:production), the server follows the production alias and the
    model's deployments (`fovea deploy`): shadow, canary and blue-green need no restart.
    """
    from fovea import serve
    from fovea._duration import parse_duration

    config = serve.ServeConfig(model=model, db=db, device=device, max_batch_size=max_batch_size,
                               max_wait_ms=max_wait_ms, max_body_bytes=int(max_body_mb * 2**20), timeout_s=timeout,
                               body_timeout_s=body_timeout, log_predictions=not no_log, hybrid=hybrid,
                               admin_token=admin_token, poll_s=poll,
                               drift_every_s=parse_duration(drift_every), drift_window=drift_window,
                               drift_webhook=drift_webhook, review_below=review_below, consensus=consensus,
                               unknown=not no_unknown)
    if not 0 <= review_below <= 1 or consensus < 1:
        raise FoveaError("--review-below must lie in [0, 1] and --consensus be at least 1")
    if poll <= 0:
        raise FoveaError("--poll must be positive")
    serve.check_servable(model, db)  # here, in one line, rather than as a failed start-up inside uvicorn
    setup_logging()
    serve.run(config, host=host, port=port, workers=workers)


@app.command("batch", epilog=examples(
    "fovea batch runs/pets photos/",
    "fovea batch pets:production uploads.csv --db postgresql://fovea@db/fovea --output preds.parquet",
    "fovea batch pets photos/ --job nightly-2026-11-23",
    "fovea batch pets photos/ --engine ray --actors 8 --ray-address ray://head:10001"))
def batch_command(
    model: ModelRefArg,
    source: Annotated[Path, typer.Argument(help="A folder of images (searched recursively) or a CSV with a path column.")],
    db: DbOption = None,
    job: Annotated[str | None, typer.Option(help="Job name (default: model version + source); the same job "
                                                 "resumes where it stopped.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass and per transaction.")] = 64,
    workers: Annotated[int, typer.Option(min=1, help="Decoding threads.")] = 4,
    output: Annotated[Path | None, typer.Option(help="Also write the job's rows to this Parquet file.")] = None,
    device: DeviceOption = "auto",
    engine: Annotated[str, typer.Option(help="local (threads here) | ray (Ray Data actors; pip install 'fovea[ray]').")] = "local",
    actors: Annotated[int, typer.Option(min=1, help="--engine ray: model replicas (each loads the model).")] = 2,
    ray_address: Annotated[str | None, typer.Option(help="--engine ray: the cluster (default: start a local "
                                                         "Ray instance; 'auto': the one on this machine).")] = None,
    no_unknown: NoUnknownOption = False,
    as_json: JsonOption = False,
) -> None:
    """Predict every image into the database; killed and restarted, it loses and duplicates nothing."""
    from fovea.batch import run_batch

    r = run_batch(model, source, db=db, job=job, batch_size=batch_size, workers=workers, device=device,
                  output=output, progress=not as_json, engine=engine, actors=actors, ray_address=ray_address,
                  unknown=not no_unknown)
    if as_json:
        echo_json(r.to_dict())
        return
    typer.echo(f"job {r.job}: {r.predicted} predicted, {r.already_done} already stored, {len(r.unreadable)} unreadable "
               f"of {r.inputs} inputs in {r.seconds:.1f} s ({r.model}:{r.version})")
    for key, reason in r.unreadable[:20]:
        typer.echo(f"  unreadable: {key}: {reason}", err=True)
    if r.output:
        typer.echo(f"parquet: {r.output}")
