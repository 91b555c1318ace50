"""A real RabbitMQ broker (Debian's rabbitmq-server) started for tests, on 127.0.0.1.

Everything the broker writes lives in a temporary folder (its database, logs, Erlang
cookie), it listens on free loopback ports (AMQP, Erlang distribution, its own epmd),
under a node name of its own, so several can run beside a system broker; it is stopped
and removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def rabbitmq_available() -> bool:
    """Whether Debian's rabbitmq-server is installed."""
    return SERVER.is_file() and shutil.which("erl") is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RabbitMQ:
    """A running broker: ``url`` is its AMQP URL (user ``guest``, vhost ``/``)."""

    url: str
    port: int
    nodename: str


def _wait_amqp(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    from kombu import Connection

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rabbitmq-server exited with {proc.returncode}")
        try:
            with Connection(url, connect_timeout=2) as conn:
                conn.connect()
                return
        except Exception:  # not listening yet, or still booting
            time.sleep(0.5)
    raise TimeoutError(f"RabbitMQ did not accept AMQP connections in {timeout:.0f} s")


@contextmanager
def rabbitmq_server(timeout: float = 120.0) -> Iterator[RabbitMQ]:
    """Start a throw-away RabbitMQ on free loopback ports; stop and remove it afterwards.

    Raises
    ------
    RuntimeError
        rabbitmq-server is not installed, or it exited while starting (its log is kept
        in the message).
    """
    if not rabbitmq_available():
        raise RuntimeError("RabbitMQ is not installed (apt-get install rabbitmq-server)")
    base = Path(tempfile.mkdtemp(prefix="dicomnode-rabbitmq-"))
    port, dist_port, epmd_port = _free_port(), _free_port(), _free_port()
    nodename = f"dicomnode-{uuid.uuid4().hex[:8]}@localhost"
    (base / "enabled_plugins").write_text("[].\n")
    (base / "rabbitmq.conf").write_text(
        "loopback_users = none\n"
        "log.console = false\n"
        f"listeners.tcp.1 = 127.0.0.1:{port}\n")
    env = {
        **os.environ, "HOME": str(base), "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"), "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_NODENAME": nodename, "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": "127.0.0.1", "RABBITMQ_ENABLED_PLUGINS_FILE":
        str(base / "enabled_plugins"), "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
    }
    log = (base / "server.out").open("wb")
    proc = subprocess.Popen([str(SERVER)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=base, start_new_session=True)
    url = f"amqp://guest:guest@127.0.0.1:{port}//"
    try:
        try:
            _wait_amqp(url, proc, timeout)
        except (RuntimeError, TimeoutError) as exc:
            text = (base / "server.out").read_text(errors="replace")
            raise RuntimeError(f"{exc}: {text[-2000:]}") from exc
        yield RabbitMQ(url, port, nodename)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(10)
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        subprocess.run([epmd, "-port", str(epmd_port), "-kill"], env=env,
                       capture_output=True, timeout=30, check=False)
        log.close()
        shutil.rmtree(base, ignore_errors=True)
