"""Serving the dashboard from ``dicomnode serve``: uvicorn in a thread of the node.

The socket is bound before the thread starts, so a taken port or a wrong address is a
clear logged error at start-up (and the DICOM listener goes on), and port 0 gives a free
port that ``WebServer.port`` reports.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING

import uvicorn

from dicomnode.logs import fields
from dicomnode.web.app import create_app

if TYPE_CHECKING:
    from dicomnode.node import Node

log = logging.getLogger(__name__)


class WebServer:
    """The dashboard of one running node.

    Parameters
    ----------
    node : Node
        Its settings (``settings.web``), database, counters and workers are shared.
    """

    def __init__(self, node: Node) -> None:
        assert node.settings.web is not None
        self.web = node.settings.web
        self.app = create_app(node.settings, node.db, node)
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The port bound (useful with port 0); None when not serving."""
        return int(self._socket.getsockname()[1]) if self._socket is not None else None

    @property
    def url(self) -> str | None:
        """The dashboard's base URL; None when not serving."""
        if self.port is None:
            return None
        host = self.web.bind_address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def start(self) -> bool:
        """Bind and serve in a background thread.

        Returns
        -------
        bool
            False when the address cannot be bound (logged as ``web.bind_failed``).
        """
        family = socket.AF_INET6 if ":" in self.web.bind_address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.web.bind_address, self.web.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            log.error("web.bind_failed", extra=fields(
                address=self.web.bind_address, port=self.web.port,
                reason=exc.strerror or str(exc),
                hint="set web.port to a free port, or web: null to turn the dashboard off"))
            return False
        self._socket = sock
        config = uvicorn.Config(self.app, log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="web", daemon=True)
        self._thread.start()
        log.info("web.listening", extra=fields(url=self.url,
                                               auth="required" if not self.web.loopback
                                               else "for actions"))
        return True

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
