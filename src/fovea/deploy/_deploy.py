"""Roll-outs in the store: shadow, canary, blue-green; their health figures; promotion and rollback.

A deployment puts a candidate version of a model beside its ``production`` version. Everything about it
lives in the ``deployments`` table, so every server replica follows the same one; each replica's controller
(``fovea.serve``) calls ``advance`` every few seconds, and the transitions are conditional updates
(``... WHERE state = 'running' AND step = :step``), so when several replicas judge at once, one wins and the
others see the result.

- shadow: the candidate answers a copy of every request in the background; users get production's answer.
  Its figures (agreement, latency, confidence) accumulate until ``fovea rollback`` stops it or another
  deployment of the same candidate replaces it.
- canary: the candidate answers ``percent`` of requests (sticky per client id); production answers the same
  inputs in the background as the reference. At every controller tick the step's figures are judged
  against the thresholds, and a regression rolls it back at once; after ``interval_s`` of a healthy
  step with enough samples it moves to the next step, and after the last (100 %) it is promoted.
- blue-green: each replica loads and warms the candidate beside production; the first to have it warm
  switches the ``production`` alias, and every replica swaps at once. The previous version stays loaded, so
  ``fovea rollback`` switches back instantly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select, update

from fovea import model_registry
from fovea.errors import FoveaError
from fovea.store import Alias, Deployment, DeploymentEvent, PredictionRecord, Store

STRATEGIES = ("shadow", "canary", "blue-green")
DEFAULT_STEPS = (10.0, 25.0, 50.0, 100.0)


def now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)  # SQLite hands back naive datetimes


@dataclass
class Thresholds:
    """When a candidate counts as a regression (judged on the current step's figures)."""

    max_error_rate: float = 0.02  # share of the candidate's inputs it failed on
    max_p95_ratio: float = 1.5  # candidate p95 latency / production p95 ...
    p95_slack_ms: float = 10.0  # ... and at least this much slower (a 2 ms model is allowed 3 ms)
    max_confidence_drop: float = 0.10  # production's mean confidence minus the candidate's
    min_agreement: float = 0.90  # same label as production on the same inputs
    min_samples: int = 50  # candidate answers before any judgement or promotion

    @classmethod
    def of(cls, values: dict[str, Any] | None) -> Thresholds:
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise FoveaError(f"unknown thresholds {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise FoveaError(f"threshold {k} must be a number, got {v!r}")
        t = cls(**values)
        ranges = {"max_error_rate": (0, 1), "max_confidence_drop": (0, 1), "min_agreement": (0, 1),
                  "max_p95_ratio": (1, float("inf")), "p95_slack_ms": (0, float("inf")),
                  "min_samples": (1, float("inf"))}
        for k, (lo, hi) in ranges.items():
            v = getattr(t, k)
            if not lo <= v <= hi:
                raise FoveaError(f"threshold {k} must be within [{lo:g}, {hi:g}], got {v:g}")
        t.min_samples = int(t.min_samples)
        return t


@dataclass
class View:
    """A deployment as the CLI, the admin routes and the server see it."""

    id: int
    name: str
    strategy: str
    state: str  # running | promoted | rolled_back | stopped
    production: model_registry.Version
    candidate: model_registry.Version | None
    percent: float
    steps: list[float]
    step: int
    interval_s: float
    thresholds: Thresholds
    reason: str | None
    created: datetime
    step_started: datetime
    ended: datetime | None
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["production"], d["candidate"] = self.production.ref, self.candidate.ref if self.candidate else None
        for k in ("created", "step_started", "ended"):
            d[k] = d[k].isoformat(timespec="seconds") if d[k] else None
        return d


def _view(store: Store, row: Deployment, events: bool = False) -> View:
    versions = {v.id: v for v in model_registry.versions(row.name, store=store)}
    ev: list[dict[str, Any]] = []
    if events:
        with store.session() as s:
            ev = [{"time": _utc(e.created).isoformat(timespec="seconds"), "kind": e.kind, "message": e.message,
                   "stats": e.stats}
                  for e in s.scalars(select(DeploymentEvent).where(DeploymentEvent.deployment_id == row.id)
                                     .order_by(DeploymentEvent.id))]
    return View(row.id, row.name, row.strategy, row.state, versions[row.production_id],
                versions.get(row.candidate_id) if row.candidate_id else None, row.percent, list(row.steps), row.step,
                row.interval_s, Thresholds.of(row.thresholds), row.reason, _utc(row.created), _utc(row.step_started),
                _utc(row.ended) if row.ended else None, ev)


def _event(s: Any, deployment_id: int, kind: str, message: str, stats: dict[str, Any] | None = None) -> None:
    s.add(DeploymentEvent(deployment_id=deployment_id, kind=kind, message=message, stats=stats or {}))


def production(name: str, store: Store) -> model_registry.Version:
    """The version behind ``NAME:production``."""
    try:
        return model_registry.resolve(f"{name}:production", store=store)
    except FoveaError:
        raise FoveaError(f"{name} has no production version yet; point the alias at one: "
                         f"fovea registry alias {name}:VERSION production") from None


def active(name: str, store: Store) -> View | None:
    """The running deployment of ``name``, if any."""
    with store.session() as s:
        row = s.scalar(select(Deployment).where(Deployment.name == name, Deployment.state == "running")
                       .order_by(Deployment.id.desc()).limit(1))
    return _view(store, row) if row else None


def deployments(name: str | None = None, *, store: Store | None = None, limit: int = 50) -> list[View]:
    """Newest first."""
    store = store or Store()
    with store.session() as s:
        q = select(Deployment).order_by(Deployment.id.desc()).limit(limit)
        rows = s.scalars(q.where(Deployment.name == name) if name else q).all()
    return [_view(store, r, events=True) for r in rows]


def start(ref: str, strategy: str, *, percent: float | None = None, steps: list[float] | None = None,
          interval_s: float = 600.0, thresholds: dict[str, Any] | None = None, store: Store | None = None) -> View:
    """Start rolling out ``ref`` (``NAME:VERSION`` or ``NAME:ALIAS``) beside ``NAME:production``."""
    store = store or Store()
    if strategy not in STRATEGIES:
        raise FoveaError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if ":" not in ref:
        raise FoveaError(f"name the version to roll out: {ref}:VERSION (see fovea registry list {ref})")
    if thresholds is not None and not isinstance(thresholds, dict):
        raise FoveaError(f"thresholds must be an object of name: number, got {thresholds!r}")
    candidate = model_registry.resolve(ref, store=store)
    model_registry.verify(candidate)  # files gone or changed: refuse now, not in every replica's controller later
    current = production(candidate.name, store)
    if candidate.id == current.id:
        raise FoveaError(f"{candidate.ref} is already {candidate.name}'s production version")
    if candidate.classes != current.classes:
        raise FoveaError(f"{candidate.ref} predicts {candidate.classes}, production {current.ref} predicts "
                         f"{current.classes}: answers could not be compared")
    limits = Thresholds.of(thresholds)
    if interval_s <= 0:
        raise FoveaError("--interval must be positive")
    plan: list[float] = []
    if strategy == "canary":
        if steps:
            plan = [float(p) for p in steps]
            if percent is not None and float(percent) != plan[0]:
                raise FoveaError(f"--percent {percent:g} and --steps starting at {plan[0]:g} disagree")
        elif percent is not None:
            plan = [float(percent), *(p for p in DEFAULT_STEPS if p > percent)]
        else:
            plan = list(DEFAULT_STEPS)
        if any(not 0 < p <= 100 for p in plan) or plan != sorted(plan) or plan[-1] != 100:
            raise FoveaError(f"canary steps must rise within (0, 100] and end at 100, got {plan}")
    running = active(candidate.name, store)
    with store.session() as s:
        if running is not None:
            if running.strategy == "shadow" and running.candidate and running.candidate.id == candidate.id:
                s.execute(update(Deployment).where(Deployment.id == running.id)
                          .values(state="stopped", ended=now(), reason=f"replaced by a {strategy}"))
                _event(s, running.id, "stopped", f"replaced by a {strategy} of {candidate.ref}")
            else:
                raise FoveaError(f"{candidate.name} already has a running {running.strategy} of "
                                 f"{running.candidate.ref if running.candidate else '?'} (#{running.id}); "
                                 f"end it first: fovea rollback {candidate.name}")
        row = Deployment(name=candidate.name, strategy=strategy, state="running", production_id=current.id,
                         candidate_id=candidate.id, percent=plan[0] if plan else 0.0, steps=plan, step=0,
                         interval_s=interval_s, thresholds=asdict(limits), step_started=now())
        s.add(row)
        s.flush()
        what = (f"{plan[0]:g} % of requests" if strategy == "canary" else
                {"shadow": "a copy of every request", "blue-green": "loading beside production, then all requests"}[strategy])
        _event(s, row.id, "started", f"{strategy}: {candidate.ref} gets {what}; production is {current.ref}")
    return _view(store, row, events=True)


def _numbers(rows: list[Any]) -> dict[str, Any]:
    import numpy as np

    ok = [r for r in rows if not r.error]
    lat = np.array([r.latency_ms for r in ok]) if ok else np.zeros(0)
    return {"n": len(rows), "errors": len(rows) - len(ok),
            "error_rate": (len(rows) - len(ok)) / len(rows) if rows else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
            "mean_confidence": float(np.mean([r.confidence for r in ok])) if ok else None}


def stats(d: View, store: Store, since: datetime | None = None) -> dict[str, Any]:
    """The candidate's and production's figures on this deployment's traffic (since ``since``), and how often
    they gave the same label to the same input (agreement)."""
    if d.candidate is None:
        return {}
    with store.session() as s:
        q = select(PredictionRecord.request_id, PredictionRecord.fingerprint, PredictionRecord.model_version, PredictionRecord.label,
                   PredictionRecord.confidence, PredictionRecord.latency_ms, PredictionRecord.error).where(PredictionRecord.deployment_id == d.id)
        if since is not None:
            q = q.where(PredictionRecord.created >= since)
        rows = s.execute(q).all()
    cand = [r for r in rows if r.model_version == d.candidate.version]
    prod = [r for r in rows if r.model_version == d.production.version]
    reference = {(r.request_id, r.fingerprint): r.label for r in prod if not r.error}
    pairs = [(r.label, reference[(r.request_id, r.fingerprint)]) for r in cand
             if not r.error and (r.request_id, r.fingerprint) in reference]
    return {"candidate": _numbers(cand), "production": _numbers(prod), "compared": len(pairs),
            "agreement": sum(a == b for a, b in pairs) / len(pairs) if pairs else None}


def figures_now(d: View, store: Store) -> dict[str, Any] | None:
    """What a running deployment is judged on now: a canary's current step, a shadow's whole run."""
    if d.state != "running":
        return None
    return stats(d, store, since=d.step_started if d.strategy == "canary" else None)


def overview(name: str | None = None, *, store: Store | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Deployments newest first as JSON-ready dicts, a running one's live figures under "figures" (what the
    CLI's table, the admin route and the web app's page show)."""
    store = store or Store()
    out = []
    for d in deployments(name, store=store, limit=limit):
        row = d.to_dict()
        if d.state == "running":
            row["figures"] = figures_now(d, store)
        out.append(row)
    return out


def judge(figures: dict[str, Any], limits: Thresholds) -> str | None:
    """Why the candidate regressed, or None while it is healthy (or has too few samples to tell)."""
    c, p = figures.get("candidate") or {}, figures.get("production") or {}
    if c.get("n", 0) < limits.min_samples:
        return None
    reasons = []
    if c["error_rate"] > limits.max_error_rate:
        reasons.append(f"error rate {c['error_rate']:.1%} > {limits.max_error_rate:.1%}")
    if c["p95_ms"] is not None and p.get("p95_ms") is not None:
        if c["p95_ms"] > limits.max_p95_ratio * p["p95_ms"] and c["p95_ms"] > p["p95_ms"] + limits.p95_slack_ms:
            reasons.append(f"p95 latency {c['p95_ms']:.1f} ms > {limits.max_p95_ratio:g} x production's "
                           f"{p['p95_ms']:.1f} ms")
    if c["mean_confidence"] is not None and p.get("mean_confidence") is not None:
        drop = p["mean_confidence"] - c["mean_confidence"]
        if drop > limits.max_confidence_drop:
            reasons.append(f"mean confidence {c['mean_confidence']:.3f}, {drop:.3f} below production's "
                           f"{p['mean_confidence']:.3f}")
    agreement = figures.get("agreement")
    if agreement is not None and figures.get("compared", 0) >= limits.min_samples and agreement < limits.min_agreement:
        reasons.append(f"agreement with production {agreement:.1%} < {limits.min_agreement:.0%}")
    return "; ".join(reasons) or None


def _updated(s: Any, statement: Any) -> int:
    """Rows changed by a conditional UPDATE: 1 for the replica whose transition it was, 0 for the others."""
    return int(s.execute(statement).rowcount)


def _finish(store: Store, d: View, state: str, reason: str, figures: dict[str, Any] | None = None,
            set_production: model_registry.Version | None = None) -> bool:
    """Move a running deployment to ``state`` unless another replica already moved it; True if this call did."""
    with store.session() as s:
        done = _updated(s, update(Deployment).where(Deployment.id == d.id, Deployment.state == "running",
                                                    Deployment.step == d.step)
                        .values(state=state, reason=reason, ended=now(), updated=now()))
        if not done:
            return False
        if set_production is not None:
            _point_production(s, d.name, set_production)
        _event(s, d.id, state, reason, figures)
    return True


def _point_production(s: Any, name: str, version: model_registry.Version) -> None:
    row = s.scalar(select(Alias).where(Alias.name == name, Alias.alias == "production"))
    if row is None:
        s.add(Alias(name=name, alias="production", version_id=version.id))
    else:
        row.version_id = version.id


def promote(d: View, store: Store, reason: str = "promoted", figures: dict[str, Any] | None = None) -> bool:
    """Make the candidate production (blue-green's switch, a canary's last step)."""
    assert d.candidate is not None
    return _finish(store, d, "promoted", reason, figures, set_production=d.candidate)


def advance(d: View, store: Store, at: datetime | None = None) -> View:
    """One controller tick for a running canary: roll back on a regression, step or promote when a healthy step
    has lasted its interval. Other strategies are unchanged here (shadow runs until stopped; blue-green is
    switched by the server that has the candidate warm)."""
    if d.state != "running" or d.strategy != "canary":
        return d
    at = at or now()
    figures = stats(d, store, since=d.step_started)
    why = judge(figures, d.thresholds)
    if why:
        _finish(store, d, "rolled_back", f"automatic rollback at {d.percent:g} %: {why}", figures)
    elif (at - d.step_started).total_seconds() >= d.interval_s and figures["candidate"]["n"] >= d.thresholds.min_samples:
        if d.step + 1 < len(d.steps):
            nxt = d.steps[d.step + 1]
            with store.session() as s:
                done = _updated(s, update(Deployment).where(Deployment.id == d.id, Deployment.state == "running",
                                                            Deployment.step == d.step)
                                .values(step=d.step + 1, percent=nxt, step_started=at, updated=at))
                if done:
                    _event(s, d.id, "step", f"healthy at {d.percent:g} % for {d.interval_s:g} s: now {nxt:g} %",
                           figures)
        else:
            promote(d, store, f"healthy through every step ({', '.join(f'{p:g}' for p in d.steps)} %): promoted",
                    figures)
    return refresh(d, store)


def refresh(d: View, store: Store) -> View:
    with store.session() as s:
        row = s.get(Deployment, d.id)
    assert row is not None
    return _view(store, row)


def abort(d: View, reason: str, store: Store | None = None) -> bool:
    """End a running deployment that cannot go on (its candidate will not load); False if another replica
    already ended it."""
    store = store or Store()
    return _finish(store, d, "rolled_back", reason, stats(d, store))


def rollback(name: str, *, reason: str = "rolled back by hand", store: Store | None = None) -> View:
    """End the running deployment of ``name`` (production unchanged), or undo the last promotion (production
    pointed back at the version it replaced)."""
    store = store or Store()
    running = active(name, store)
    if running is not None:
        state = "stopped" if running.strategy == "shadow" else "rolled_back"
        if not _finish(store, running, state, reason, stats(running, store)):
            raise FoveaError(f"deployment #{running.id} changed while rolling back; look again: fovea deployments {name}")
        return _view(store, _row(store, running.id), events=True)
    current = production(name, store)
    with store.session() as s:
        last = s.scalar(select(Deployment).where(Deployment.name == name, Deployment.state == "promoted")
                        .order_by(Deployment.id.desc()).limit(1))
    if last is None or last.candidate_id != current.id:
        raise FoveaError(f"nothing to roll back for {name}: no running deployment, and production ({current.ref}) "
                         "was not set by the last promotion")
    d = _view(store, last)
    with store.session() as s:
        s.execute(update(Deployment).where(Deployment.id == d.id).values(state="rolled_back", reason=reason,
                                                                         updated=now()))
        _point_production(s, name, d.production)
        _event(s, d.id, "rolled_back", f"{reason}: production back to {d.production.ref}")
    return _view(store, _row(store, d.id), events=True)


def _row(store: Store, deployment_id: int) -> Deployment:
    with store.session() as s:
        row = s.get(Deployment, deployment_id)
    assert row is not None
    return row


def sticky_bucket(deployment_id: int, client: str) -> float:
    """A client's place in [0, 100): the same for the whole deployment, so a client in the canary at 10 % stays
    in it at 25 % (the canary share only grows)."""
    import hashlib

    h = hashlib.sha256(f"{deployment_id}:{client}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 * 100


def takes_turn(n: int, percent: float) -> bool:
    """Whether request number ``n`` (1, 2, ...) of a client-less stream goes to the candidate: exactly
    ``percent`` % of every run of requests, evenly spread (no sampling noise on small traffic)."""
    return math.floor(n * percent / 100) > math.floor((n - 1) * percent / 100)
