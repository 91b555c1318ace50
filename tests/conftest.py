"""Shared fixtures: free ports, settings under tmp_path, a running node."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.config import Settings, load_settings
from dicomnode.node import Node
from tests.postgres import TEST_SERVER_ENV, PostgresServer, postgres_bin, postgres_server
from tests.rabbitmq import RabbitMQ, rabbitmq_available, rabbitmq_server

# Nodes started by tests (in-process or as `dicomnode serve` subprocesses, which inherit
# this) serve no dashboard unless a test asks for one: the default port 8080 would be
# taken by the first of them. tests/web start theirs on port 0.
os.environ.setdefault("DICOMNODE_WEB", "off")


@pytest.fixture(autouse=True)
def _reset_package_logging() -> Iterator[None]:
    """Commands run in-process (CliRunner) configure logging; undo it after each test."""
    yield
    root = logging.getLogger("dicomnode")
    for handler in list(root.handlers):
        if not isinstance(handler, logging.NullHandler):
            root.removeHandler(handler)
    root.setLevel(logging.NOTSET)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session: the one ``DICOMNODE_TEST_DATABASE_URL`` names,
    else Debian's started on a free loopback port (skipped where it is not installed)."""
    if os.environ.get(TEST_SERVER_ENV):
        yield PostgresServer(os.environ[TEST_SERVER_ENV])
        return
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMQ]:
    """Debian's RabbitMQ for the session, on free loopback ports (skipped where it is not
    installed)."""
    if not rabbitmq_available():
        pytest.skip("RabbitMQ is not installed (apt-get install rabbitmq-server)")
    with rabbitmq_server() as broker:
        yield broker


@pytest.fixture(autouse=True)
def _database_on_postgres(request: pytest.FixtureRequest,
                          monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """With ``DICOMNODE_TEST_DATABASE_URL`` set, every test's node index is a fresh
    PostgreSQL database on that server (``DICOMNODE_DATABASE_URL``, which subprocesses
    inherit) instead of a SQLite file; tests that name a SQLite URL keep it."""
    if not os.environ.get(TEST_SERVER_ENV):
        yield
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.create_database()
    monkeypatch.setenv("DICOMNODE_DATABASE_URL", url)
    yield
    server.drop_database(url.rsplit("/", 1)[1])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded-default settings on a free loopback port, data under tmp_path."""
    return load_settings(
        None, port=free_port(), bind_address="127.0.0.1", data_dir=tmp_path / "var",
        disk_reserve_mb=0, warm_up=False, seg_writer_process=False, web=None,
        completion={"quiet_period_s": 30, "poll_interval_s": 0.2},
        export={"backoff_initial_s": 0.2, "backoff_max_s": 1.0, "poll_interval_s": 0.1,
                "connect_timeout_s": 5},
    )


@pytest.fixture
def node(settings: Settings) -> Iterator[Node]:
    """A started node (stopped afterwards)."""
    n = Node(settings)
    n.start()
    yield n
    n.stop()
