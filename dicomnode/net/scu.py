"""C-STORE SCU: send files to a DICOM peer (used by the export outbox), plain or over TLS."""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.presentation import build_context

from dicomnode.config import PeerTls
from dicomnode.logs import fields
from dicomnode.net.tls import client_context

log = logging.getLogger(__name__)


class _ConnectErrors(logging.Filter):
    """Notes why pynetdicom could not connect or lost the connection (TLS above all).

    pynetdicom reports a failed connection or TLS handshake only in its log, from the
    association's network thread, and returns an association that is not established;
    the reason belongs in the delivery's error instead. While ``send_files`` waits for
    its association, the reasons pynetdicom logs are noted with the thread that logged
    them; the send keeps those of its own association's threads. Records pass unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._captures: list[list[tuple[int | None, str]]] = []

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[tuple[int | None, str]]]:
        noted: list[tuple[int | None, str]] = []
        with self._lock:
            self._captures.append(noted)
        try:
            yield noted
        finally:
            with self._lock:
                self._captures.remove(noted)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._captures:
            return True
        exc = record.exc_info[1] if record.exc_info else record.msg
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = f"TLS: certificate verify failed: {exc.verify_message}"
        elif isinstance(exc, ssl.SSLError):
            reason = f"TLS: {str(exc.reason or exc).lower().replace('_', ' ')}"
        elif record.getMessage().startswith("TCP Initialisation Error"):
            reason = record.getMessage().split(": ", 1)[-1]
        else:
            return True
        with self._lock:
            for noted in self._captures:
                noted.append((record.thread, reason))
        return True


_connect_errors = _ConnectErrors()
for _name in ("pynetdicom.transport", "pynetdicom.dul"):
    logging.getLogger(_name).addFilter(_connect_errors)


class SendError(RuntimeError):
    """Nothing could be sent: the peer refused or could not be reached."""


@dataclass
class SendResult:
    """Per-file outcome of one send."""

    sent: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every file was stored by the peer."""
        return not self.failed


def send_files(
    paths: Sequence[Path],
    *,
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "DICOMNODE",
    timeout_s: float = 30.0,
    tls: PeerTls | None = None,
) -> SendResult:
    """Send DICOM files over one association, each in its own transfer syntax.

    Parameters
    ----------
    paths : sequence of Path
        DICOM files (with file meta).
    host, port : str, int
        The peer's address.
    called_aet : str
        The peer's AE title.
    calling_aet : str
        Our AE title.
    timeout_s : float
        Connection, ACSE and DIMSE timeout (the TLS handshake included).
    tls : PeerTls, optional
        Send over DICOM TLS: the peer's certificate is checked against these CAs (and
        ``host``), the node's own certificate presented if configured.

    Returns
    -------
    SendResult

    Raises
    ------
    SendError
        The association was refused, aborted or not established (with the connection's
        or the TLS handshake's error when there is one).
    ValueError
        A TLS file that cannot be loaded.
    """
    contexts: dict[tuple[str, str], None] = {}
    metas: list[tuple[Path, str, str]] = []
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        sop_class = str(meta.file_meta.MediaStorageSOPClassUID)
        ts = str(meta.file_meta.TransferSyntaxUID)
        contexts[(sop_class, ts)] = None
        metas.append((path, sop_class, ts))
    if len(contexts) > 128:
        raise SendError(f"{len(contexts)} presentation contexts needed, at most 128 allowed")
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    requested = [build_context(sop, [ts]) for sop, ts in contexts]
    tls_args = (client_context(tls), host) if tls is not None else None
    with _connect_errors.capture() as noted:
        assoc = ae.associate(host, port, contexts=requested, ae_title=called_aet,
                             tls_args=tls_args)
    own = {assoc.ident, getattr(assoc.dul, "ident", None)}
    errors = [reason for thread, reason in noted if thread in own]
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        why = f": {errors[-1]}" if errors else ""
        raise SendError(f"association with {called_aet}@{host}:{port}"
                        f"{' over TLS' if tls else ''} {reason}{why}")
    result = SendResult()
    try:
        for path, _sop, _ts in metas:
            try:
                status = assoc.send_c_store(path)
            except (ValueError, RuntimeError) as exc:
                result.failed[str(path)] = str(exc)
                continue
            code = getattr(status, "Status", None)
            if code is not None and (code == 0x0000 or code & 0xF000 == 0xB000):
                result.sent.append(str(path))
            else:
                text = "no response" if code is None else f"status 0x{code:04X}"
                result.failed[str(path)] = text
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    for path, _sop, _ts in metas:
        if str(path) not in result.sent and str(path) not in result.failed:
            result.failed[str(path)] = "association lost"
    log.info("scu.sent", extra=fields(peer=called_aet, sent=len(result.sent),
                                      failed=len(result.failed)))
    return result
