"""GET /metrics: Prometheus text, every series labelled by model version (and the canary's share of requests)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from fovea.serve._deps import MaybeStateDep, MetricsDep

router = APIRouter()


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format"}})
async def prometheus(metrics: MetricsDep, state: MaybeStateDep) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    d = state.fleet.deployment if state is not None else None
    metrics.canary_percent.clear()
    if d is not None and d.strategy == "canary" and d.candidate is not None:
        metrics.canary_percent.labels(str(d.candidate.version)).set(d.percent)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
