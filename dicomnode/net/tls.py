"""DICOM TLS (PS3.15 Annex B): the node's TLS contexts and the listener's handshake.

Both contexts follow the non-downgrading BCP 195 profile (PS3.15 B.11, dcmtk's default
``+py``): TLS 1.2 or later only, ECDHE/DHE key exchange with AEAD ciphers for TLS 1.2
(TLS 1.3 has nothing else), no TLS compression. Whether a sender must present a
certificate is the listener's ``require_client_certificate``; the node always checks the
certificate of a peer it sends to.

pynetdicom's server does the TLS handshake inside its accept loop (``get_request``,
with no deadline): one peer that opens a connection and sends nothing would stop every
later connection from being accepted. The listener accepts plain sockets instead and
each connection's thread runs ``server_handshake`` below, bounded by the same deadline
as the association request (``association_timeout_s``, counted from the connection).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import time
from pathlib import Path

from dicomnode.config import ListenerTls, PeerTls
from dicomnode.logs import LogLimit, fields

log = logging.getLogger(__name__)

#: TLS 1.2 suites of the non-downgrading BCP 195 profile (RFC 9325 4.2): forward secrecy
#: and AEAD only. TLS 1.3 suites are OpenSSL's (all AEAD).
BCP195_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
])
#: A certificate of the node's that expires within this many days is warned about.
EXPIRY_WARNING_DAYS = 30
#: Each certificate's expiry is logged at most this often (a client context is made
#: for every delivery).
_EXPIRY_LOG_INTERVAL_S = 86400.0
_expiry_log = LogLimit(_EXPIRY_LOG_INTERVAL_S)
#: Expiry read per certificate file, by (path) -> ((mtime, size), expiry).
_expiry_read: dict[str, tuple[tuple[int, int], float | None]] = {}
#: The first byte of a TLS handshake record, and of an A-ASSOCIATE-RQ PDU.
_TLS_HANDSHAKE, _ASSOCIATE_RQ = 0x16, 0x01


class HandshakeError(Exception):
    """A TLS handshake that did not complete; ``reason`` says why in a few words.

    Parameters
    ----------
    reason : str
        Why, without any peer-supplied text beyond OpenSSL's own reason codes.
    quiet : bool
        The peer closed before sending anything (a port probe): not worth a warning.
    """

    def __init__(self, reason: str, quiet: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.quiet = quiet


def _base(purpose: int) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path) -> None:
    try:
        context.load_cert_chain(certificate, private_key)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"Invalid 'tls.certificate' value '{certificate}' - cannot load it "
                         f"with private key '{private_key}': {_reason(exc)}") from None


def certificate_expiry(certificate: Path) -> float | None:
    """When the first certificate of a PEM file stops being valid (Unix time).

    Read with CPython's own certificate decoder (the ``ssl`` module has no public
    reader of a certificate file); None where it is missing or cannot read the file.
    The file is read again only when its modification time or size changed (a client
    context is made for every delivery).
    """
    try:
        stat = os.stat(certificate)
    except OSError:
        return None
    stamp = (stat.st_mtime_ns, stat.st_size)
    known = _expiry_read.get(str(certificate))
    if known is not None and known[0] == stamp:
        return known[1]
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        expiry: float | None = float(ssl.cert_time_to_seconds(
            decode(str(certificate))["notAfter"]))
    except (ssl.SSLError, OSError, KeyError, ValueError):
        expiry = None
    _expiry_read[str(certificate)] = (stamp, expiry)
    return expiry


def check_expiry(certificate: Path, setting: str, now: float | None = None) -> float | None:
    """Log an error for an expired certificate, a warning for one that expires soon.

    Peers refuse an expired certificate in every handshake, with nothing in the node's
    own log to say why; this says it at start, and ``EXPIRY_WARNING_DAYS`` ahead (once
    a day per certificate and setting).

    Parameters
    ----------
    certificate : Path
        The PEM file (its first certificate is the node's own).
    setting : str
        The setting that names it, for the log line (``tls.certificate``, ...).
    now : float, optional
        Unix time to compare with (default: the clock).

    Returns
    -------
    float or None
        Days left (negative once expired); None where the expiry cannot be read.
    """
    expiry = certificate_expiry(certificate)
    if expiry is None:
        return None
    days = (expiry - (time.time() if now is None else now)) / 86400
    if days > EXPIRY_WARNING_DAYS or _expiry_log.admit((str(certificate), setting)) is None:
        return days
    where = fields(setting=setting, certificate=str(certificate), days_left=round(days, 1),
                   not_after=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiry)))
    if days <= 0:
        log.error("tls.certificate_expired", extra=where)
    else:
        log.warning("tls.certificate_expires_soon", extra=where)
    return days


def _load_cas(context: ssl.SSLContext, ca_certificates: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca_certificates)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"Invalid 'tls.ca_certificates' value '{ca_certificates}' - cannot "
                         f"load it: {_reason(exc)}") from None


def server_context(tls: ListenerTls) -> ssl.SSLContext:
    """The listener's TLS context.

    Parameters
    ----------
    tls : ListenerTls
        Certificate, key, CA bundle and whether senders must present a certificate.

    Returns
    -------
    ssl.SSLContext

    Raises
    ------
    ValueError
        A file that cannot be loaded (named by its setting).
    """
    context = _base(ssl.PROTOCOL_TLS_SERVER)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(context, tls.certificate, tls.private_key)
    check_expiry(tls.certificate, "tls.certificate")
    if tls.ca_certificates is not None:
        _load_cas(context, tls.ca_certificates)
        context.verify_mode = (ssl.CERT_REQUIRED if tls.require_client_certificate
                               else ssl.CERT_OPTIONAL)
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: PeerTls) -> ssl.SSLContext:
    """The TLS context for sending to one peer.

    Parameters
    ----------
    tls : PeerTls
        CA bundle (the system's when unset), hostname check, the node's certificate.

    Returns
    -------
    ssl.SSLContext

    Raises
    ------
    ValueError
        A file that cannot be loaded (named by its setting).
    """
    context = _base(ssl.PROTOCOL_TLS_CLIENT)     # CERT_REQUIRED, hostname checked
    context.check_hostname = tls.check_hostname
    if tls.ca_certificates is not None:
        _load_cas(context, tls.ca_certificates)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.certificate is not None and tls.private_key is not None:
        _load_chain(context, tls.certificate, tls.private_key)
        check_expiry(tls.certificate, "peers.tls.certificate")
    return context


def server_handshake(context: ssl.SSLContext, sock: socket.socket,
                     deadline: float) -> ssl.SSLSocket:
    """Run the server side of a TLS handshake on an accepted socket, by ``deadline``.

    Parameters
    ----------
    context : ssl.SSLContext
        From ``server_context``.
    sock : socket.socket
        The accepted connection; it belongs to the returned socket afterwards, and is
        closed when the handshake fails.
    deadline : float
        ``time.monotonic()`` by which the handshake must be complete.

    Returns
    -------
    ssl.SSLSocket
        The connection, blocking, handshake done.

    Raises
    ------
    HandshakeError
        Not complete by the deadline, not TLS, refused by either side, or closed.
    """
    try:
        sock.setblocking(False)
        _wait(sock, select.POLLIN, deadline)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except ConnectionError:
            first = b""
        except OSError as exc:
            raise HandshakeError(f"connection error: {_reason(exc)}") from None
        if not first:
            raise HandshakeError("closed before the handshake", quiet=True)
        if first[0] != _TLS_HANDSHAKE:
            raise HandshakeError("plain DICOM on the TLS port" if first[0] == _ASSOCIATE_RQ
                                 else "not a TLS handshake")
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except OSError as exc:    # the peer reset the connection after its first byte
        sock.close()
        raise HandshakeError(_reason(exc)) from None
    except HandshakeError:
        sock.close()
        raise
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                _wait(tls, select.POLLIN, deadline)
            except ssl.SSLWantWriteError:
                _wait(tls, select.POLLOUT, deadline)
            except (ssl.SSLError, OSError) as exc:
                raise HandshakeError(_reason(exc)) from None
    except HandshakeError:
        with contextlib.suppress(OSError):
            tls.close()
        raise
    tls.setblocking(True)
    return tls


def _wait(sock: socket.socket, events: int, deadline: float) -> None:
    poller = select.poll()
    poller.register(sock, events)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HandshakeError("no TLS handshake within association_timeout_s")
        try:
            if poller.poll(remaining * 1000):
                return
        except OSError as exc:
            raise HandshakeError(f"connection error: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """A short reason for a TLS or socket error, from OpenSSL's codes (no peer text)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "closed by the peer during the handshake"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, ConnectionError):
        return "closed by the peer during the handshake"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__
