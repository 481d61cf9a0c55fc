"""Persistence: model versions, aliases, deployments, predictions and feedback (SQLAlchemy + Alembic).

``Store()`` opens ``sqlite:///$FOVEA_HOME/fovea.db``; ``Store("postgresql://user@host/db")`` a PostgreSQL
database that several server replicas share. Either is migrated to the newest schema when opened.
"""

from fovea.store._schema import (
    Alias,
    Base,
    Deployment,
    DeploymentEvent,
    Feedback,
    ModelVersion,
    Prediction,
    Review,
    Vote,
)
from fovea.store._store import Store, default_url

__all__ = ["Alias", "Base", "Deployment", "DeploymentEvent", "Feedback", "ModelVersion", "Prediction", "Review",
           "Store", "Vote", "default_url"]
