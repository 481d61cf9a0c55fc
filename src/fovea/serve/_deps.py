"""The routes' dependencies, as ``Annotated`` aliases: the server state, the version answering now, the store
behind the admin token, the store behind the read-only and review routes, and ids as the database holds them.

They are ``async`` so that they run on the event loop: a plain ``def`` dependency would cost every request a
hop to a worker thread.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request

from fovea.serve._fleet import Served
from fovea.serve._state import HTTPProblem, Metrics, ServerState
from fovea.store import Store


async def find_state(request: Request) -> ServerState | None:
    """The server state, or None before the lifespan has made it (health and metrics answer even then)."""
    return getattr(request.app.state, "server", None)


MaybeStateDep = Annotated[ServerState | None, Depends(find_state)]


async def get_state(state: MaybeStateDep) -> ServerState:
    if state is None:
        raise HTTPProblem(503, "the model is still loading")
    return state


StateDep = Annotated[ServerState, Depends(get_state)]


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def get_served(state: StateDep) -> Served:
    """The version answering now, or 503 while the model loads."""
    return state.served()


ServedDep = Annotated[Served, Depends(get_served)]


async def get_admin_store(request: Request, state: StateDep) -> Store:
    """The store, for a request that carries the admin token: 403 when the server has none, 401 when it is wrong."""
    token = state.config.admin_token
    if not token:
        raise HTTPProblem(403, "admin routes are off: start the server with --admin-token (or FOVEA_ADMIN_TOKEN)")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPProblem(401, "admin routes need the header 'Authorization: Bearer TOKEN'")
    if state.store is None:
        raise HTTPProblem(409, "this server serves a model folder, not the registry: nothing to deploy")
    return state.store


AdminStoreDep = Annotated[Store, Depends(get_admin_store)]


async def get_viewer_store(request: Request, state: StateDep) -> Store:
    """The store, for the read-only and review routes: open unless the server has an admin token, then they need it
    too."""
    if state.config.admin_token:
        await get_admin_store(request, state)
    if state.store is None:
        raise HTTPProblem(409, "this server keeps no store: there is no review queue")
    return state.store


ViewerStoreDep = Annotated[Store, Depends(get_viewer_store)]


# Review ids and model versions are 64-bit integers in the database: a larger one cannot name a row, and the
# drivers raise OverflowError on it rather than find nothing. Refused (422) with the bounds in the schema.
MAX_DB_ID = 2**63 - 1
DbIdPath = Annotated[int, Path(ge=0, le=MAX_DB_ID, description="a 64-bit id, 0..2^63-1")]
