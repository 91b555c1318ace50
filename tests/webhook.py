"""A real HTTP webhook receiver for tests and benchmarks: http.server on 127.0.0.1.

It answers each POST with the next status of ``answers`` (then ``status``), after
``delay_s`` (longer than the node's timeout: a slow endpoint), and records every
request it read: its path, headers, JSON body and when it arrived.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    """One request as the receiver read it."""

    path: str
    headers: dict[str, str]
    raw: bytes
    at: float  # time.time() once the body was read

    @property
    def body(self) -> Any:
        """The JSON document."""
        return json.loads(self.raw)


class WebhookReceiver:
    """Records POSTs; see the module docstring.

    Parameters
    ----------
    status : int
        The answer once ``answers`` is used up.
    answers : sequence of int
        The answers to the first requests, in order.
    delay_s : float
        Wait before answering.
    """

    def __init__(self, status: int = 200, answers: Sequence[int] = (),
                 delay_s: float = 0.0) -> None:
        self.status = status
        self.answers = list(answers)
        self.delay_s = delay_s
        self.requests: list[Received] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._changed:
                    receiver.requests.append(Received(self.path, dict(self.headers), raw,
                                                      time.time()))
                    status = receiver.answers.pop(0) if receiver.answers else receiver.status
                    receiver._changed.notify_all()
                time.sleep(receiver.delay_s)
                try:
                    self.send_response(status)
                    if 300 <= status < 400:
                        self.send_header("Location", "/elsewhere")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:  # the client gave up waiting (its timeout)
                    pass

            def do_GET(self) -> None:
                # where a redirect points: answers, so that a client that followed it
                # with a GET would take the alarm for sent
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/hooks/urgent"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name=f"webhook-{self.port}")

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Received]:
        """The requests once at least ``count`` have arrived (AssertionError at timeout)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(f"{len(self.requests)} of {count} requests in {timeout} s")
            return list(self.requests)

    def start(self) -> WebhookReceiver:
        """Start serving."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def webhook_receiver(status: int = 200, answers: Sequence[int] = (),
                     delay_s: float = 0.0) -> Iterator[WebhookReceiver]:
    """A started :class:`WebhookReceiver`, stopped afterwards."""
    receiver = WebhookReceiver(status, answers, delay_s).start()
    try:
        yield receiver
    finally:
        receiver.stop()
