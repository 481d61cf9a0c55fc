"""The tables: model versions and their aliases, deployments, predictions and feedback.

One schema for SQLite (the default file in FOVEA_HOME) and PostgreSQL (several server replicas share it).
Changes to it go through an Alembic migration in ``migrations/versions``; a test checks that the models
here and the migrated database agree.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def now() -> datetime:
    return datetime.now(timezone.utc)


# BigInteger ids on PostgreSQL, plain INTEGER (rowid, autoincrementing) on SQLite
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ModelVersion(Base):
    """A registered model: an artifact copied into FOVEA_HOME/models/NAME/VERSION."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)  # the copy in FOVEA_HOME
    source: Mapped[str] = mapped_column(Text)  # where it was registered from
    digest: Mapped[str] = mapped_column(String(64))  # sha256 over the artifact's files
    runtime: Mapped[str] = mapped_column(String(40))  # torch | onnxruntime | torch.export | ensemble
    classes: Mapped[list[Any]] = mapped_column(JSON)
    image_size: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Alias(Base):
    """A movable name for one version of a model: ``production``, ``candidate``, ..."""

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("name", "alias", name="uq_aliases_name_alias"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    alias: Mapped[str] = mapped_column(String(100))
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now, onupdate=now)


class Deployment(Base):
    """A roll-out of a candidate beside the current model; its state is what every replica follows."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    strategy: Mapped[str] = mapped_column(String(20))  # shadow | canary | blue-green
    state: Mapped[str] = mapped_column(String(20), index=True)  # running | promoted | rolled_back | stopped
    production_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    candidate_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    percent: Mapped[float] = mapped_column(Float, default=0.0)  # share of traffic the candidate answers
    steps: Mapped[list[Any]] = mapped_column(JSON, default=list)
    step: Mapped[int] = mapped_column(Integer, default=0)
    interval_s: Mapped[float] = mapped_column(Float, default=600.0)
    thresholds: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now, onupdate=now)
    step_started: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)  # the canary step's clock
    ended: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DeploymentEvent(Base):
    """What happened to a deployment and why: started, stepped, promoted, rolled back (with the figures)."""

    __tablename__ = "deployment_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"), index=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    kind: Mapped[str] = mapped_column(String(20))  # started | step | promoted | rolled_back | stopped
    message: Mapped[str] = mapped_column(Text)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class PredictionRecord(Base):
    """One answer of one model to one input, online or batch (``job`` + ``input_key`` make batch idempotent)."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("job", "input_key", name="uq_predictions_job_input"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now, index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16), default="served")  # served | shadow | reference (see fovea.deploy)
    deployment_id: Mapped[int | None] = mapped_column(ForeignKey("deployments.id"), nullable=True)
    label: Mapped[str] = mapped_column(String(200))
    confidence: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    latency_ms: Mapped[float] = mapped_column(Float)
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)  # sha256 of the input bytes
    client_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    source: Mapped[str] = mapped_column(String(16), default="online")  # online | batch
    job: Mapped[str | None] = mapped_column(String(200), nullable=True)
    input_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # float32 little-endian
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # the model failed on this input (label empty)
    image_stats: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)  # fovea.monitor.STATS, in order
    # the model's unknown-image score (label "unknown" when over its threshold); None: a closed-set model
    unknown_score: Mapped[float | None] = mapped_column(Float, nullable=True)


class Feedback(Base):
    """The true label of an input, given later (by request id or by image fingerprint)."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    fingerprint: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    label: Mapped[str] = mapped_column(String(200))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Review(Base):
    """An upload the model was unsure of, waiting for people to confirm or correct its label."""

    __tablename__ = "reviews"
    __table_args__ = (UniqueConstraint("model_name", "fingerprint", name="uq_reviews_model_fingerprint"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    model_version: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of the image bytes
    path: Mapped[str] = mapped_column(Text)  # the saved upload
    predicted: Mapped[str] = mapped_column(String(200))
    confidence: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20), index=True, default="pending")  # pending | labelled | rejected
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)  # the agreed label
    saved_to: Mapped[str | None] = mapped_column(Text, nullable=True)  # where the labelled copy went
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    decided: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # "upload": an answer the model was unsure of (or called unknown); "label": an image of a training data set
    # whose given label is suspected wrong (fovea check --labels): verdicts become that data set's corrections.
    kind: Mapped[str] = mapped_column(String(20), default="upload", server_default="upload")
    given: Mapped[str | None] = mapped_column(String(200), nullable=True)  # kind "label": the label it has now
    data_root: Mapped[str | None] = mapped_column(Text, nullable=True)  # kind "label": the data set it is in


class Vote(Base):
    """One reviewer's label for one review (the last vote of a reviewer counts)."""

    __tablename__ = "votes"
    __table_args__ = (UniqueConstraint("review_id", "reviewer", name="uq_votes_review_reviewer"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    review_id: Mapped[int] = mapped_column(ForeignKey("reviews.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(200))
    label: Mapped[str] = mapped_column(String(200))  # a class, or "" for "none of these"
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now, onupdate=now)
