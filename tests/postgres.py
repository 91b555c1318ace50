"""A real PostgreSQL server (Debian's package) started for tests, on 127.0.0.1.

``postgres_server()`` runs ``initdb`` into a temporary folder, starts the server with
``pg_ctl`` on a free loopback port (its socket in that folder too), yields a
:class:`PostgresServer` that creates and drops databases, and stops and removes it
afterwards. PostgreSQL refuses to run as root, and CI runs as root: then the server
runs as the ``postgres`` user that Debian's package creates.

Run a command against a started server (what ``scripts/test`` does for its second pass)::

    python -m tests.postgres -- python -m pytest tests/store
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: The environment variable that points the test suite at a PostgreSQL server: a
#: SQLAlchemy URL of its maintenance database (each test gets a fresh database on it).
TEST_SERVER_ENV = "DICOMNODE_TEST_DATABASE_URL"


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL binaries (newest major version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("pg_ctl")
    return Path(exe).parent if exe else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """A PostgreSQL server reachable at ``127.0.0.1:port`` as its superuser ``postgres``.

    Parameters
    ----------
    admin_url : str
        SQLAlchemy URL (``postgresql+psycopg://``) of the maintenance database.
    """

    def __init__(self, admin_url: str) -> None:
        from sqlalchemy.engine import make_url

        self.admin_url = make_url(admin_url)

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        return self.admin_url.set(database=database).render_as_string(hide_password=False)

    def _execute(self, sql: str) -> None:
        import psycopg

        url = self.admin_url
        with psycopg.connect(host=url.host, port=url.port, user=url.username,
                             password=url.password, dbname=url.database,
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)  # type: ignore[arg-type]  # names made here, never input

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh name unless given); returns its URL."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        self._execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, closing any connection still open to it."""
        self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a throw-away PostgreSQL server on a free loopback port; stop and remove it.

    Durability is switched off (``fsync``, ``synchronous_commit``, ``full_page_writes``):
    the server lives for one test session, and the tests are about SQL and locking.

    Raises
    ------
    RuntimeError
        PostgreSQL is not installed, or the server did not start (its log is quoted).
    """
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="dicomnode-pg-"))
    data, log = base / "data", base / "server.log"
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses root: run it as Debian's postgres user
        shutil.chown(base, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off "
               "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
    try:
        subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        started = subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
             "-w", "-t", "60", "start"], capture_output=True, timeout=90)
        if started.returncode != 0:
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {started.stderr!r} {text[-2000:]}")
        yield PostgresServer(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres")
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m",
                            "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str]) -> int:
    """Run the command after ``--`` with ``DICOMNODE_TEST_DATABASE_URL`` set to a server."""
    command = argv[argv.index("--") + 1:] if "--" in argv else argv
    if not command:
        print("usage: python -m tests.postgres -- COMMAND ...", file=sys.stderr)
        return 2
    # stopped by a signal (a CI timeout), the server is still stopped and removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with postgres_server() as server:
        env = {**os.environ, TEST_SERVER_ENV: server.url("postgres")}
        started = time.monotonic()
        proc = subprocess.Popen(command, env=env)
        try:
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)
        print(f"postgres pass: rc={rc} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))
