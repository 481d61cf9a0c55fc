"""Alembic environment: run by ``fovea.store`` with a connection in ``config.attributes``, or by the
``alembic`` command with ``sqlalchemy.url`` set (``alembic -x url=... upgrade head`` from this folder)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from fovea.store._schema import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("give the database: alembic -x url=sqlite:///path/fovea.db upgrade head")
    with create_engine(url).connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run()
