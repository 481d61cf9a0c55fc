"""The store: one SQLAlchemy engine over SQLite (default) or PostgreSQL, migrated to the newest schema on open."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from fovea._home import home
from fovea.errors import FoveaError

MIGRATIONS = Path(__file__).parent / "migrations"
_migrated: set[str] = set()
_lock = threading.Lock()


def default_url() -> str:
    """``sqlite:///$FOVEA_HOME/fovea.db``: one file, nothing to install."""
    return f"sqlite:///{home() / 'fovea.db'}"


def _normalize(url: str) -> str:
    # psycopg 3 is the driver Fovea installs; a bare postgresql:// URL would make SQLAlchemy look for psycopg2
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    """WAL: readers never block the writer (the server logs while the CLI reads); wait, don't fail, on a lock."""
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Store:
    """An engine and a session factory; ``with store.session() as s:`` commits on success, rolls back on error."""

    def __init__(self, url: str | None = None, *, migrate: bool = True) -> None:
        self.url = _normalize(url or default_url())
        if self.url.startswith("sqlite:///"):
            folder = Path(self.url.removeprefix("sqlite:///")).expanduser().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise FoveaError(f"cannot keep the store in {folder}: a file is in the way (is FOVEA_HOME a file?); "
                                 "set FOVEA_HOME to a folder, or give --db") from None
        try:
            self.engine: Engine = create_engine(self.url, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError, ValueError) as e:
            raise FoveaError(f"cannot use database {self.safe_url}: {e}") from e
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.migrate()

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden, for messages and logs."""
        try:
            return self.engine.url.render_as_string(hide_password=True)
        except AttributeError:
            return self.url.split("@")[-1]

    def migrate(self) -> None:
        """Upgrade the database to the newest schema (Alembic); once per URL and process."""
        from alembic import command
        from alembic.config import Config

        with _lock:
            if self.url in _migrated:
                return
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            try:
                with self.engine.begin() as conn:
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
            except SQLAlchemyError as e:
                raise FoveaError(f"cannot open database {self.safe_url}: {str(e).splitlines()[0]}") from e
            _migrated.add(self.url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def dispose(self) -> None:
        self.engine.dispose()
