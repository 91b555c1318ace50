"""The listener's connections: limits, deadlines and a cap on what one PDU may hold.

pynetdicom's association server gives every TCP connection an association thread, counts
``maximum_associations`` over those threads (so a connection that never sends a byte, or
one already closed but still waiting out its ACSE timeout, holds a slot), reads each PDU
whole into memory whatever length its header announces, and reads it without any time
limit once its first byte is in (its ARTIM timer is only looked at between PDUs). A
handful of idle or trickling sockets could lock every sender out, and one PDU header
announcing 4 GiB made the node buffer whatever followed.

Here, with pynetdicom's own extension points where it has them (``make_server`` with a
server and request-handler class, ``acse_timeout``, event handlers), and three small
per-connection replacements where it has none (each says why):

- an association slot is taken when the A-ASSOCIATE-RQ arrives and given back when the
  association ends: ``max_associations`` counts associations, not sockets, and
  ``max_associations_per_ip`` bounds what one address holds; an address may also keep
  at most that many connections that have not yet sent their request;
- the A-ASSOCIATE-RQ must arrive within ``association_timeout_s`` of the connection,
  every later PDU within ``pdu_timeout_s`` of its first byte;
- a PDU longer than ``max_pdu`` (P-DATA-TF; other PDUs: ``MAX_CONTROL_PDU``) aborts the
  association as soon as its header is read, before any of it is buffered;
- an exception in pynetdicom's state machine (a malformed P-DATA, an event its state does
  not expect) aborts the association with an A-ABORT and one log line instead of
  killing its network thread with a traceback;
- on a TLS listener the handshake runs on the connection's own thread, not in the
  accept loop as pynetdicom's server does it, within the association request's deadline
  (``tls.py``), so that a peer that never completes it holds neither the accept loop
  nor, past the deadline, its thread or its place among the pending connections.

A node with a plain and a TLS listener shares one ``AssociationSlots`` between them:
the limits count the node's associations, whichever port they came in on.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pynetdicom import evt
from pynetdicom.fsm import TRANSITION_TABLE, InvalidEventError
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicomnode.config import Settings
from dicomnode.logs import LogLimit, fields
from dicomnode.net.tls import HandshakeError, server_handshake

log = logging.getLogger(__name__)

#: Longest PDU other than P-DATA-TF the node reads: an A-ASSOCIATE-RQ with 128
#: presentation contexts of ten transfer syntaxes each is about 100 KiB.
MAX_CONTROL_PDU = 256 * 1024
_P_DATA_TF = 0x04
_PDU_TYPES = frozenset(range(0x01, 0x08))
#: A TLS handshake record's first byte: a TLS client on the plain port.
_TLS_HANDSHAKE_RECORD = 0x16
_HEADER = struct.Struct(">BBL")
# A-ABORT PDU from the service provider (PS3.8 9.3.8): reason 0 "not specified",
# 6 "invalid PDU parameter value" (the length).
_ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02"
_REASON_NOT_SPECIFIED, _REASON_INVALID_PARAMETER = b"\x00", b"\x06"
#: A-ASSOCIATE-RJ: rejected-transient, service provider (presentation), local limit exceeded.
_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)
#: Seconds between two log lines about connections refused to one address.
_REFUSAL_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    """What one listener allows each connection (see ``Settings``)."""

    max_associations: int = 16
    max_associations_per_ip: int = 8
    association_timeout_s: float = 5.0
    pdu_timeout_s: float = 10.0
    max_pdu: int = 2**20

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        """The limits a node's settings set.

        Parameters
        ----------
        settings : Settings

        Returns
        -------
        ConnectionLimits
        """
        return cls(settings.max_associations, settings.max_associations_per_ip,
                   settings.association_timeout_s, settings.pdu_timeout_s, settings.max_pdu)


#: Called as ``(calling_aet, address, reason, called_aet)`` for a request the node rejects.
RejectionCallback = Callable[[str, str, str, str], object]
#: Called with the association once its thread has ended, whatever the way.
EndCallback = Callable[[Any], object]
#: Called as ``(address, reason)`` for a connection whose TLS handshake failed.
HandshakeFailedCallback = Callable[[str, str], object]


class AssociationSlots:
    """The association slots and pending connections of one node, across its listeners."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted: dict[Any, _Connection] = {}
        self.pending: Counter[str] = Counter()
        self.associated: Counter[str] = Counter()
        self.refusals = LogLimit(_REFUSAL_LOG_INTERVAL_S)   # log lines per address
        self.associations = 0


class _PduCutError(Exception):
    """Internal: a PDU the node will not read to its end."""

    def __init__(self, event: str, reason: bytes, **details: object) -> None:
        super().__init__(event)
        self.event = event
        self.reason = reason
        self.details = details


class _PeerClosedError(Exception):
    """Internal: the peer closed the connection (or it broke) inside a PDU."""


class _PduReader:
    """Reads each PDU whole, within its deadline, refusing one longer than the cap.

    pynetdicom reads a PDU with ``AssociationSocket.recv(6)`` (the header) and then
    ``recv(length)``, blocking until all of it is in, with no upper bound on
    ``length``. This object replaces ``recv`` on one association's socket (nothing
    in pynetdicom offers a hook there): the header call reads the whole PDU into a
    buffer sized once the length is checked, and returns the header; the next call
    returns the body. A PDU cut short (too long, too slow, or the connection gone)
    returns an empty header, which pynetdicom takes for a closed connection (event 17:
    the association ends, aborted); the peer is sent an A-ABORT first.
    """

    def __init__(self, connection: _Connection, asock: Any) -> None:
        self._connection = connection
        self._asock = asock
        self._body: bytearray | None = None
        self._first = True
        self._refused = False

    def recv(self, nr_bytes: int) -> bytearray | memoryview:
        """pynetdicom's ``AssociationSocket.recv`` for this connection."""
        if self._refused:   # after a header that is no PDU, the rest is not DICOM either
            return bytearray()
        body, self._body = self._body, None
        if body is not None and len(body) == nr_bytes:
            return body
        if nr_bytes != _HEADER.size or body is not None:
            # not the pattern above: pynetdicom changed; read what it asks within a deadline
            return self._bounded(nr_bytes)
        limits = self._connection.limits
        now = time.monotonic()
        deadline = now + limits.pdu_timeout_s
        first, self._first = self._first, False
        if first:  # the A-ASSOCIATE-RQ: ARTIM runs from the connection on
            deadline = min(deadline, self._connection.accepted_at + limits.association_timeout_s)
        try:
            header = self._read(_HEADER.size, deadline)
            pdu_type, _, length = _HEADER.unpack(header)
            if pdu_type not in _PDU_TYPES:
                if first and pdu_type == _TLS_HANDSHAKE_RECORD:
                    log.warning("association.tls_on_plain_port", extra=fields(
                        address=self._connection.ip, port=self._connection.port))
                self._refused = True
                return header  # pynetdicom refuses it (event 19) without reading on
            limit = limits.max_pdu if pdu_type == _P_DATA_TF else MAX_CONTROL_PDU
            if length > limit:
                raise _PduCutError("association.pdu_too_long", _REASON_INVALID_PARAMETER,
                                   pdu_type=pdu_type, length=length, limit=limit)
            self._body = self._read(length, deadline)
        except _PeerClosedError:
            return bytearray()
        except _PduCutError as cut:
            self._connection.cut(cut)
            return bytearray()
        return header

    def _bounded(self, nr_bytes: int) -> bytearray:
        try:
            return self._read(nr_bytes, time.monotonic() + self._connection.limits.pdu_timeout_s)
        except (_PeerClosedError, _PduCutError):
            return bytearray()

    def _read(self, nr_bytes: int, deadline: float) -> bytearray:
        sock = self._asock.socket
        if sock is None:
            raise _PeerClosedError
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        try:
            while got < nr_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                count = sock.recv_into(view[got:], nr_bytes - got)
                if not count:
                    raise _PeerClosedError
                got += count
        except TimeoutError:
            raise _PduCutError("association.pdu_timeout", _REASON_NOT_SPECIFIED,
                               received=got, expected=nr_bytes) from None
        except OSError:
            raise _PeerClosedError from None
        finally:
            view.release()
        return buf


class _Connection:
    """One accepted TCP connection: its place in the limits and its guards."""

    def __init__(self, server: ListenerServer, ip: str) -> None:
        self.server = server
        self.limits = server.limits
        self.ip = ip
        self.port = int(server.server_address[1])
        self.accepted_at = time.monotonic()
        self.phase = "pending"     # -> "associated" -> "over"; "pending" -> "over"
        self.assoc: Any = None
        self._logged_error = False

    def attach(self, assoc: Any) -> None:
        """Install the reader, the state-machine guard and the end hook on ``assoc``."""
        self.assoc = assoc
        asock = assoc.dul.socket
        asock.recv = _PduReader(self, asock).recv
        machine = assoc.dul.state_machine
        original = machine.do_action

        def do_action(event: str) -> None:
            try:
                original(event)
            except Exception as exc:  # any error aborts this association only
                self._protocol_error(event, exc, original)

        # pynetdicom lets an exception in an FSM action escape its DUL thread (the thread
        # dies with a traceback, the peer gets no A-ABORT, the association never reports
        # its end); catching it on this association's state machine is the only place.
        machine.do_action = do_action
        run = assoc.run

        def run_then_end() -> None:
            try:
                run()
            finally:
                self.end()
                self.server.association_ended(assoc)

        # The one point every way an association ends goes through (release, abort, a
        # request never sent, a rejection, the DUL thread gone): its thread's run().
        assoc.run = run_then_end
        assoc.bind(evt.EVT_REQUESTED, self._on_requested)
        for event in (evt.EVT_RELEASED, evt.EVT_ABORTED, evt.EVT_REJECTED, evt.EVT_CONN_CLOSE):
            assoc.bind(event, self._on_over)

    @property
    def calling_aet(self) -> str:
        """The calling AE title, once the request is in ('' before)."""
        primitive = getattr(self.assoc.requestor, "primitive", None) if self.assoc else None
        return str(getattr(primitive, "calling_ae_title", "") or "")

    def _on_requested(self, event: Any) -> None:
        reason = self.server.admit(self)
        if reason is None:
            return
        primitive = event.assoc.requestor.primitive
        event.assoc.acse.send_reject(*_LOCAL_LIMIT_EXCEEDED)
        self.server.on_rejected(str(primitive.calling_ae_title or ""), self.ip, reason,
                                str(primitive.called_ae_title or ""))
        event.assoc.kill()  # as pynetdicom after its own rejections: waits for the RJ to go

    def _on_over(self, event: Any) -> None:
        self.end()

    def end(self) -> None:
        """Give back this connection's place in the limits (once)."""
        self.server.release(self)

    def cut(self, cut: _PduCutError) -> None:
        """A PDU too long or too slow: tell the peer (A-ABORT), log once."""
        sock = self.assoc.dul.socket.socket if self.assoc is not None else None
        if sock is not None:
            try:
                sock.settimeout(1.0)
                sock.sendall(_ABORT + cut.reason)
            except OSError:
                pass
        log.warning(cut.event, extra=fields(calling_aet=self.calling_aet, address=self.ip,
                                            **cut.details))

    def _protocol_error(self, event: str, exc: Exception,
                        original: Callable[[str], None]) -> None:
        dul = self.assoc.dul
        state = dul.state_machine.current_state
        if state == "Sta1":  # the association is over already; a late event (a second close)
            dul.kill_dul()
            return
        if event == "Evt15" and isinstance(exc, InvalidEventError):
            # our own abort where PS3.8 has none (no association yet, or one closing):
            # close the connection instead (its primitive would come back every loop)
            with contextlib.suppress(queue.Empty):
                dul.to_provider_queue.get_nowait()
            if dul.socket is not None:
                dul.socket.close()
            return
        if not self._logged_error:
            self._logged_error = True
            log.warning("association.protocol_error", extra=fields(
                calling_aet=self.calling_aet, address=self.ip, fsm_event=event, state=state,
                error=type(exc).__name__))
        if ("Evt19", state) not in TRANSITION_TABLE:
            dul.kill_dul()
            return
        # Treat it as pynetdicom treats a PDU it cannot decode (event 19): A-ABORT to the
        # peer, A-P-ABORT to the association, then wait for the close. pynetdicom's
        # do_action stopped the DUL on its way out; it must run to do that.
        dul._kill_thread = False
        try:
            original("Evt19")
        except Exception:  # the DUL cannot abort: close the connection
            dul.kill_dul()
            asock = dul.socket
            if asock is not None:
                asock.close()


class _RequestHandler(RequestHandler):
    """pynetdicom's handler, with the connection's guards installed before it starts."""

    server: ListenerServer

    def handle(self) -> None:
        """Create the association, attach its connection, start its thread."""
        connection = self.server.take_connection(self.request, self.client_address)
        try:
            if self.server.tls_context is not None:
                tls = self.server.handshake(connection, self.request)
                if tls is None:
                    connection.end()
                    return
                self.request = tls
            assoc = self._create_association()
            connection.attach(assoc)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
        except BaseException:
            connection.end()
            raise


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with the node's connection limits.

    Parameters
    ----------
    ae, address, ae_title, contexts, evt_handlers
        As for ``pynetdicom.transport.AssociationServer``.
    ssl_context : ssl.SSLContext or None
        A TLS listener's context (``tls.server_context``): each connection's handshake
        runs on its own thread, within ``limits.association_timeout_s``.
    limits : ConnectionLimits
        What each connection is allowed.
    on_rejected : callable
        Told about each association request rejected for a limit.
    on_ended : callable, optional
        Called with each association once its thread has ended.
    on_handshake_failed : callable, optional
        Told about each connection whose TLS handshake failed (not about one closed
        before sending anything); without it, the listener logs it.
    slots : AssociationSlots, optional
        Shared with the node's other listener; a new one when not given.
    """

    # No join of connection threads at shutdown (their associations are aborted instead).
    daemon_threads = True

    def __init__(self, ae: Any, address: Any, ae_title: str, contexts: Any, ssl_context: Any,
                 evt_handlers: Any = None, *, limits: ConnectionLimits,
                 on_rejected: RejectionCallback,
                 on_ended: EndCallback | None = None,
                 on_handshake_failed: HandshakeFailedCallback | None = None,
                 slots: AssociationSlots | None = None, **kwargs: Any) -> None:
        self.limits = limits
        self.on_rejected = on_rejected
        self._on_ended = on_ended
        self._on_handshake_failed = on_handshake_failed
        self.slots = slots if slots is not None else AssociationSlots()
        #: TLS handshakes that failed, by reason (a TLS listener only).
        self.handshake_failures: Counter[str] = Counter()
        self._handshaking: set[socket.socket] = set()
        self._closing = False
        # pynetdicom's server would run the handshake in its accept loop (get_request);
        # this one keeps the context and runs it on each connection's thread.
        self.tls_context: ssl.SSLContext | None = ssl_context
        super().__init__(ae, address, ae_title, contexts, None,
                         evt_handlers=evt_handlers, request_handler=_RequestHandler, **kwargs)

    def handshake(self, connection: _Connection, sock: socket.socket) -> ssl.SSLSocket | None:
        """Run ``sock``'s TLS handshake by the association request's deadline.

        Parameters
        ----------
        connection : _Connection
            The connection ``sock`` was accepted as (its start sets the deadline).
        sock : socket.socket
            The accepted TCP connection (closed when the handshake fails).

        Returns
        -------
        ssl.SSLSocket or None
            None when the handshake failed, timed out or the listener is stopping.
        """
        assert self.tls_context is not None
        deadline = connection.accepted_at + self.limits.association_timeout_s
        with self.slots.lock:
            self._handshaking.add(sock)
        try:
            if self._closing:   # shutdown() has woken the handshakes it knew of already
                sock.close()
                return None
            tls = server_handshake(self.tls_context, sock, deadline)
        except HandshakeError as exc:
            if self._closing:
                return None
            if exc.quiet:
                log.debug("tls.closed_before_handshake", extra=fields(address=connection.ip))
                return None
            with self.slots.lock:
                self.handshake_failures[exc.reason] += 1
            if self._on_handshake_failed is not None:
                self._on_handshake_failed(connection.ip, exc.reason)
            else:
                log.warning("tls.handshake_failed", extra=fields(address=connection.ip,
                                                                  reason=exc.reason))
            return None
        finally:
            with self.slots.lock:
                self._handshaking.discard(sock)
        if self._closing:
            tls.close()
            return None
        log.debug("tls.established", extra=fields(address=connection.ip,
                                                   version=tls.version() or "",
                                                   cipher=(tls.cipher() or ("",))[0]))
        return tls

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection (a TLS listener's handshake comes later, on its thread)."""
        assert self.socket is not None
        client, address = self.socket.accept()
        return client, address

    def shutdown(self) -> None:
        """Stop accepting, and end the TLS handshakes still under way at once."""
        self._closing = True
        super().shutdown()
        with self.slots.lock:
            waiting = list(self._handshaking)
        for sock in waiting:    # wakes the handshake's poll; its thread closes the socket
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Accept a connection unless its address has too many awaiting association."""
        ip = str(client_address[0])
        with self.slots.lock:
            if self.slots.pending[ip] < self.limits.max_associations_per_ip:
                self.slots.pending[ip] += 1
                self.slots.accepted[request] = _Connection(self, ip)
                return True
        left_out = self.slots.refusals.admit(ip)
        if left_out is not None:
            log.warning("association.connection_refused", extra=fields(
                address=ip, reason="too many connections from this address awaiting "
                "association (max_associations_per_ip)", refused_since_last=left_out))
        return False

    def take_connection(self, request: Any, client_address: Any) -> _Connection:
        """The connection ``verify_request`` accepted for ``request``."""
        with self.slots.lock:
            connection = self.slots.accepted.pop(request, None)
        if connection is None:  # not through verify_request (a subclass, a test)
            ip = str(client_address[0])
            with self.slots.lock:
                self.slots.pending[ip] += 1
            connection = _Connection(self, ip)
        return connection

    def admit(self, connection: _Connection) -> str | None:
        """Take an association slot for ``connection``; the reason when none is free."""
        ip = connection.ip
        with self.slots.lock:
            if connection.phase != "pending":
                return None
            self.slots.pending[ip] -= 1
            _drop_zero(self.slots.pending, ip)
            if self.slots.associations >= self.limits.max_associations:
                reason = (f"local limit exceeded: {self.slots.associations} associations open "
                          "(max_associations)")
            elif self.slots.associated[ip] >= self.limits.max_associations_per_ip:
                reason = (f"local limit exceeded: {self.slots.associated[ip]} associations from "
                          "this address (max_associations_per_ip)")
            else:
                self.slots.associations += 1
                self.slots.associated[ip] += 1
                connection.phase = "associated"
                return None
            connection.phase = "over"
        return reason

    def release(self, connection: _Connection) -> None:
        """Give back what ``connection`` holds (idempotent)."""
        ip = connection.ip
        with self.slots.lock:
            if connection.phase == "pending":
                self.slots.pending[ip] -= 1
                _drop_zero(self.slots.pending, ip)
            elif connection.phase == "associated":
                self.slots.associations -= 1
                self.slots.associated[ip] -= 1
                _drop_zero(self.slots.associated, ip)
            connection.phase = "over"

    @staticmethod
    def close_connection(assoc: Any) -> None:
        """Close an association's connection without an A-ABORT (one not established).

        Its thread then ends by itself within ``association_timeout_s`` (the ACSE wait
        for a request that will not come); nothing it holds needs waiting for.
        """
        asock = getattr(assoc.dul, "socket", None)
        if asock is not None and asock.socket is not None:
            asock.close()

    def association_ended(self, assoc: Any) -> None:
        """Run the end callback for an association whose thread has ended."""
        if self._on_ended is not None:
            self._on_ended(assoc)

    @property
    def counts(self) -> dict[str, Any]:
        """Associations held and connections awaiting association, per address."""
        with self.slots.lock:
            slots = self.slots
            return {"associations": slots.associations, "associated": dict(slots.associated),
                    "pending": dict(slots.pending)}


def _drop_zero(counter: Counter[str], key: str) -> None:
    if counter[key] <= 0:
        del counter[key]


def start_listener(ae: Any, address: tuple[str, int], evt_handlers: list[Any],
                   limits: ConnectionLimits, on_rejected: RejectionCallback,
                   on_ended: EndCallback | None = None, *,
                   ssl_context: ssl.SSLContext | None = None,
                   on_handshake_failed: HandshakeFailedCallback | None = None,
                   slots: AssociationSlots | None = None) -> ListenerServer:
    """Start a ``ListenerServer`` in a background thread, as ``AE.start_server`` would.

    Parameters
    ----------
    ae : pynetdicom.AE
        The listening AE (its supported contexts, AE title and timeouts apply).
    address : tuple
        ``(host, port)`` to bind.
    evt_handlers : list
        ``(event, handler)`` pairs bound to every association.
    limits : ConnectionLimits
    on_rejected, on_ended, on_handshake_failed : callable
        See ``ListenerServer``.
    ssl_context : ssl.SSLContext, optional
        Makes it a TLS listener (``tls.server_context``).
    slots : AssociationSlots, optional
        Shared with another listener of the same node.

    Returns
    -------
    ListenerServer
    """
    server = ae.make_server(address, evt_handlers=evt_handlers, server_class=ListenerServer,
                            ssl_context=ssl_context, limits=limits, on_rejected=on_rejected,
                            on_ended=on_ended, on_handshake_failed=on_handshake_failed,
                            slots=slots)
    # pynetdicom's own non-blocking start_server, with our class: its shutdown() takes the
    # server off the AE's list of servers
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)
    return server

