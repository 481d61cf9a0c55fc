"""A drift check end to end: a window of traffic (from the store, or a folder of images), the tests, concept
drift from feedback, alerts (a log line, a webhook) and an HTML report. ``fovea drift`` and the server's
periodic check both call ``check``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fovea.errors import FoveaError
from fovea.monitor._concept import ConceptResult, concept_drift, expected_calibration_error
from fovea.monitor._drift import DriftResult, detect
from fovea.monitor._reference import Observations, load_reference, observe_files
from fovea.monitor._stats import STATS

log = logging.getLogger("fovea.monitor")


@dataclass
class Window:
    """Traffic to test: a sample, where it came from, and (from the store) the true labels people sent."""

    sample: Observations
    source: str
    start: str | None = None
    end: str | None = None


@dataclass
class DriftCheck:
    model: str
    version: int
    window: Window
    drift: DriftResult
    concept: ConceptResult | None
    reference_accuracy: float | None
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def alert(self) -> bool:
        return self.drift.drift or bool(self.concept and self.concept.drift)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "source": self.window.source,
                "start": self.window.start, "end": self.window.end, "alert": self.alert,
                "drift": self.drift.to_dict(), "concept": self.concept.to_dict() if self.concept else None,
                "unreadable": self.unreadable}

    def summary(self) -> str:
        d = self.drift
        parts = [f"{self.model}:{self.version} window of {d.n_window} ({self.window.source}): "
                 + (f"DRIFT (p = {d.p_value:.3g}; flagged: {', '.join(d.flagged())})" if d.drift
                    else f"no drift (p = {d.p_value:.3g})")]
        if self.concept:
            c = self.concept
            parts.append(f"accuracy {c.accuracy:.1%} on {c.n} with feedback vs {c.reference_accuracy:.1%} at "
                         f"validation (p = {c.p_value:.3g}{', CONCEPT DRIFT' if c.drift else ''})")
        return "; ".join(parts)


def window_from_store(store: Any, name: str, version: int, classes: list[str], *, last: int | None = 500,
                      since: timedelta | None = None) -> Window:
    """The newest ``last`` answers of this model version (or those of the last ``since``), with the feedback
    given for them."""
    from sqlalchemy import select

    from fovea.store import Feedback, PredictionRecord

    q = (select(PredictionRecord.request_id, PredictionRecord.fingerprint, PredictionRecord.probabilities,
                PredictionRecord.embedding, PredictionRecord.image_stats, PredictionRecord.unknown_score,
                PredictionRecord.created)
         .where(PredictionRecord.model_name == name, PredictionRecord.model_version == version, PredictionRecord.role == "served",
                PredictionRecord.source == "online", PredictionRecord.error.is_(None))
         .order_by(PredictionRecord.id.desc()))
    if since is not None:
        q = q.where(PredictionRecord.created >= datetime.now(timezone.utc) - since)
    if last is not None:
        q = q.limit(last)
    with store.session() as s:
        rows = s.execute(q).all()[::-1]
        ids = {r.request_id for r in rows}
        feedback = {f.request_id: f.label for f in s.scalars(select(Feedback).where(Feedback.request_id.in_(ids)))} if ids else {}
    if not rows:
        raise FoveaError(f"no online predictions of {name}:{version} in the store for this window")
    probs = np.array([[float(r.probabilities.get(c, 0.0)) for c in classes] for r in rows], np.float32)
    # an answer logged without statistics (an older server) has none: NaN, which the tests leave out, not 0
    stats = np.array([r.image_stats if r.image_stats else [np.nan] * len(STATS) for r in rows], np.float32)
    emb = None
    if all(r.embedding for r in rows):
        emb = np.stack([np.frombuffer(r.embedding, "<f4") for r in rows])
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index.get(feedback.get(r.request_id, ""), -1) for r in rows], np.int64)
    unknown = None  # NaN for an answer logged without a score (a closed-set version, --no-unknown)
    if any(r.unknown_score is not None for r in rows):
        unknown = np.array([np.nan if r.unknown_score is None else r.unknown_score for r in rows], np.float32)
    return Window(Observations(probs, stats, emb, labels, unknown), "store", rows[0].created.isoformat(timespec="seconds"),
                  rows[-1].created.isoformat(timespec="seconds"))


def window_from_files(model: Any, paths: list[Path]) -> tuple[Window, list[tuple[str, str]]]:
    sample, bad = observe_files(model, paths)
    return Window(sample, f"{len(paths)} files"), bad


def check_drift(model: Any, folder: Path, name: str, version: int, window: Window, *, alpha: float = 0.05,
          permutations: int = 1000, seed: int = 0, reference: Observations | None = None) -> DriftCheck:
    """Test ``window`` against the reference saved in the artifact ``folder`` (or ``reference``, already loaded)."""
    reference = reference if reference is not None else load_reference(folder)
    if len(window.sample) < 10:
        raise FoveaError(f"only {len(window.sample)} images in the window; a drift test needs at least 10")
    drift = detect(reference, window.sample, list(model.classes), alpha=alpha, permutations=permutations, seed=seed,
                   unknown_threshold=getattr(model, "unknown_threshold", None))
    ref_acc: float | None = None
    ref_ece: float | None = None
    if reference.labels is not None and (reference.labels >= 0).any():
        known = reference.labels >= 0
        correct = reference.predicted[known] == reference.labels[known]
        ref_acc = float(correct.mean())
        ref_ece = expected_calibration_error(reference.confidence[known], correct.astype(float))
    concept = None
    labels = window.sample.labels
    if labels is not None and ref_acc is not None and (labels >= 0).sum() >= 10:
        known = labels >= 0
        correct = window.sample.predicted[known] == labels[known]
        concept = concept_drift(window.sample.confidence[known], correct, ref_acc, ref_ece, alpha)
    return DriftCheck(name, version, window, drift, concept, ref_acc)


def alert(result: DriftCheck, webhook: str | None = None) -> None:
    """A log line for every check (a warning when something drifted), and the JSON to ``webhook`` on an alert."""
    (log.warning if result.alert else log.info)("drift check: %s", result.summary())
    if result.alert and webhook:
        import httpx

        try:
            httpx.post(webhook, json={"text": result.summary(), **result.to_dict()}, timeout=10).raise_for_status()
        except httpx.HTTPError as e:
            log.warning("drift webhook %s failed: %s", webhook, e)
