"""Drift checks of the served traffic: every ``--drift-every`` seconds in the background, or on demand.

A check tests the newest ``--drift-window`` logged answers of the version answering now against the reference its
model folder holds, posts an alert to ``--drift-webhook``, and writes ``FOVEA_HOME/drift/NAME/VERSION/``
(``latest.html`` and ``history.jsonl``, which the web app reads); the p-values go to /metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from fovea.errors import FoveaError
from fovea.serve._fleet import Served
from fovea.serve._state import ServerState

log = logging.getLogger("fovea.serve")


def folder(s: Served) -> Path:
    """Where the checks of ``s`` are written."""
    from fovea._home import home

    return home() / "drift" / s.name / str(s.version)


def check_once(state: ServerState, s: Served) -> Any:
    """One drift check of ``s`` over its newest answers; None when it cannot run yet."""
    from fovea.monitor import REFERENCE, alert, check_drift, load_reference, window_from_store, write_drift_report

    config, model_folder = state.config, Path(getattr(s.model, "path", ""))
    if not (model_folder / REFERENCE).exists() or state.store is None:
        return None
    try:
        window = window_from_store(state.store, s.name, s.version, list(s.model.classes), last=config.drift_window)
    except FoveaError:  # nothing logged yet
        return None
    if len(window.sample) < min(50, config.drift_window):
        return None
    reference = load_reference(model_folder)
    result = check_drift(s.model, model_folder, s.name, s.version, window, reference=reference)
    alert(result, config.drift_webhook)
    out = folder(s)
    write_drift_report(out / "latest.html", result, reference)
    with (out / "history.jsonl").open("a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result.to_dict()},
                           default=float) + "\n")
    return result


async def watch(state: ServerState) -> None:
    """Check the version answering now every ``drift_every_s`` seconds, until cancelled."""
    metrics = state.metrics
    while True:
        await asyncio.sleep(state.config.drift_every_s)
        s = state.fleet.current
        if s is None:
            continue
        try:
            result = await state.check(check_once, state, s)
        except Exception as e:  # noqa: BLE001 - monitoring must never take the server down
            log.warning("drift check failed: %s", e)
            continue
        if result is not None:
            label = str(s.version)
            metrics.drift_p.labels(label, "all").set(result.drift.p_value)
            for t in result.drift.tests:
                metrics.drift_p.labels(label, t.family).set(t.p_value)
            metrics.drift_alert.labels(label).set(1.0 if result.alert else 0.0)
