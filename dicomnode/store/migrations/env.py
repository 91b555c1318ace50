"""Alembic environment: runs against the engine handed over by ``Database.upgrade``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from dicomnode.store.models import Base

config = context.config
engine = config.attributes.get("engine") or create_engine(
    config.get_main_option("sqlalchemy.url") or ""
)

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # a node and its workers starting at once: one migrates, the others wait and
            # then find the schema at head (the lock ends with the transaction)
            connection.execute(text("SELECT pg_advisory_xact_lock(7348117)"))
        context.run_migrations()
    connection.commit()
