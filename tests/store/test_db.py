"""The Alembic migrations build exactly the schema the models describe, on SQLite and on
PostgreSQL, and go down again."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from dicomnode.store.db import Database, postgres_driver
from dicomnode.store.models import Base
from tests.postgres import PostgresServer

MIGRATIONS = ["0001", "0002"]


def _url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'x.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()


def _diff(db: Database) -> list[object]:
    with db.engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_migrations_match_models(kind: str, tmp_path: Path,
                                 request: pytest.FixtureRequest) -> None:
    db = Database(_url(kind, tmp_path, request))
    try:
        db.upgrade()
        db.upgrade()  # idempotent
        assert _diff(db) == []
    finally:
        db.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_every_migration_goes_down_and_up_again(kind: str, tmp_path: Path,
                                                request: pytest.FixtureRequest) -> None:
    db = Database(_url(kind, tmp_path, request))
    try:
        db.upgrade()
        full = set(inspect(db.engine).get_table_names())
        for revision in reversed(MIGRATIONS[:-1]):  # one step down at a time
            db.downgrade(revision)
            assert set(inspect(db.engine).get_table_names()) < full
        db.downgrade("base")
        assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
        for revision in MIGRATIONS:  # and up again one at a time
            db.upgrade(revision)
        assert set(inspect(db.engine).get_table_names()) == full
        assert _diff(db) == []
    finally:
        db.dispose()


def test_a_plain_postgresql_url_uses_psycopg_3() -> None:
    assert postgres_driver("postgresql://u:p@h:5432/d") == "postgresql+psycopg://u:p@h:5432/d"
    assert postgres_driver("postgres://h/d") == "postgresql+psycopg://h/d"
    assert postgres_driver("postgresql+psycopg://h/d") == "postgresql+psycopg://h/d"
    assert postgres_driver("sqlite:///x.db") == "sqlite:///x.db"
