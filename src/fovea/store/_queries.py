"""The queries the server runs, and the fingerprint that joins an upload across the store.

An image's fingerprint is the SHA-256 of its bytes: the same file uploaded online, listed by ``fovea batch``
or queued for review has the same one, which is how ``--hybrid`` finds a stored batch answer and how the
review queue keeps one row per image.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import select

from fovea.store._schema import Feedback, PredictionRecord
from fovea.store._store import Store


def fingerprint(blob: bytes) -> str:
    """The SHA-256 of ``blob`` as 64 hex digits."""
    return hashlib.sha256(blob).hexdigest()


def add_feedback(store: Store, *, request_id: str, label: str) -> bool:
    """Record the true label of an answered request; whether a logged prediction has that request id."""
    with store.session() as db:
        matched = db.scalar(select(PredictionRecord.id).where(PredictionRecord.request_id == request_id).limit(1))
        db.add(Feedback(request_id=request_id, label=label))
    return matched is not None


def stored_predictions(store: Store, *, name: str, version: int,
                       fingerprints: list[str]) -> dict[str, tuple[dict[str, float], float | None]]:
    """{fingerprint: (probabilities, unknown score)} of the images a batch job already predicted with this very
    model version."""
    with store.session() as db:
        rows = db.execute(select(PredictionRecord.fingerprint, PredictionRecord.probabilities,
                                 PredictionRecord.unknown_score).where(
            PredictionRecord.source == "batch", PredictionRecord.model_name == name, PredictionRecord.model_version == version,
            PredictionRecord.fingerprint.in_(set(fingerprints)))).all()
    return {f: ({k: float(v) for k, v in p.items()}, u) for f, p, u in rows}
