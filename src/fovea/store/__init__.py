"""Persistence: model versions, aliases, deployments, predictions and feedback (SQLAlchemy + Alembic).

``Store()`` opens ``sqlite:///$FOVEA_HOME/fovea.db``; ``Store("postgresql://user@host/db")`` a PostgreSQL
database that several server replicas share. Either is migrated to the newest schema when opened.
``fingerprint(bytes)`` is the key an upload is known by everywhere (SHA-256); ``add_feedback`` and
``stored_predictions`` are the queries the server runs.
"""

from fovea.store._queries import add_feedback, fingerprint, stored_predictions
from fovea.store._schema import (
    Alias,
    Base,
    Deployment,
    DeploymentEvent,
    Feedback,
    ModelVersion,
    PredictionRecord,
    Review,
    Vote,
)
from fovea.store._store import Store, default_url

__all__ = ["Alias", "Base", "Deployment", "DeploymentEvent", "Feedback", "ModelVersion", "PredictionRecord", "Review",
           "Store", "Vote", "add_feedback", "default_url", "fingerprint", "stored_predictions"]
