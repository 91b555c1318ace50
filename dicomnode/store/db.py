"""Database engine, sessions and schema migrations (Alembic).

SQLite is the embedded default: WAL journal, ``synchronous=NORMAL`` (a committed
transaction survives a process crash; the spool files, fsynced before the commit,
let ``InstanceStore.recover`` re-index anything a power loss takes from the WAL),
foreign keys on, and one writer at a time through ``Database.write_lock``.
PostgreSQL (production, and the index that several listeners and workers share) is
reached through psycopg 3: a plain ``postgresql://`` URL means ``postgresql+psycopg://``.
Writers in other processes are kept apart by the database itself (row locks, ``SELECT ...
FOR UPDATE SKIP LOCKED`` for claims, unique constraints), not by ``write_lock``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.logs import fields

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def rowcount(result: object) -> int:
    """Rows an UPDATE or DELETE touched (a CursorResult's rowcount, which SQLAlchemy
    types as Result)."""
    return int(getattr(result, "rowcount", 0) or 0)


def make_engine(url: str) -> Engine:
    """Create an engine for ``url``; SQLite gets its directory created and its pragmas.

    Parameters
    ----------
    url : str
        SQLAlchemy database URL.

    Returns
    -------
    sqlalchemy.engine.Engine
    """
    kwargs: dict[str, Any] = {"future": True}
    url = postgres_driver(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def postgres_driver(url: str) -> str:
    """``postgresql://`` and ``postgres://`` as ``postgresql+psycopg://`` (psycopg 3, the
    ``scale`` extra; SQLAlchemy would otherwise look for psycopg2); other URLs unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def alembic_config(engine: Engine) -> Config:
    """An Alembic configuration bound to ``engine`` (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # configparser interpolates "%": a password may hold one
    cfg.set_main_option("sqlalchemy.url",
                        engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    cfg.attributes["engine"] = engine
    return cfg


class Database:
    """Engine + session factory + the write lock.

    Parameters
    ----------
    url : str
        SQLAlchemy URL.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.write_lock = threading.RLock()

    def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` (default the newest migration).

        On PostgreSQL the migration holds an advisory lock, so a node and its workers
        starting together migrate once, one after the other.
        """
        command.upgrade(alembic_config(self.engine), revision)
        log.debug("db.upgraded", extra=fields(url=self.engine.url.render_as_string()))

    def downgrade(self, revision: str) -> None:
        """Take the schema back to ``revision`` (``"base"``: no tables), e.g. to undo an
        upgrade before going back to an older release."""
        command.downgrade(alembic_config(self.engine), revision)
        log.info("db.downgraded", extra=fields(revision=revision))

    @property
    def is_postgresql(self) -> bool:
        """Whether the index is PostgreSQL (shared by several processes)."""
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read session (no commit)."""
        with self._sessions() as session:
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A write session committed on exit, rolled back on error, one writer at a time."""
        with self.write_lock, self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
