"""The node's DICOM listener: C-ECHO and C-STORE SCP.

Every storage SOP class is negotiated so that a class the node does not keep is
refused with a DIMSE status (0x0122) the sender can log, rather than a bare
presentation-context rejection. The C-STORE handler never decodes pixel data: it
takes the encoded dataset, checks its header, spools it durably and indexes it, and
only then answers success. An exception in a handler becomes a failure status.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    dimse_messages,
    evt,
)
from sqlalchemy.exc import SQLAlchemyError

from dicomnode.config import Settings
from dicomnode.logs import LogLimit, fields
from dicomnode.metrics import NodeMetrics
from dicomnode.net import direct_encoding
from dicomnode.net.tls import certificate_expiry, server_context
from dicomnode.net.transport import (
    AssociationSlots,
    ConnectionLimits,
    ListenerServer,
    start_listener,
)
from dicomnode.store.header import InstanceRejectedError
from dicomnode.store.instances import InstanceStore, StoreOutcome
from dicomnode.store.models import AuditEvent
from dicomnode.store.spool import Spool, SpoolFullError

log = logging.getLogger(__name__)

# DIMSE statuses of the Storage Service Class (PS3.4 B.2.3) used by the node.
VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (C-ECHO)
STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_STORE = 0xA710
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_MISSING_UID = 0xC220
# A UID clash with what is stored. Cxxx is the Storage class's own failure range for a
# data set the SCP will not take ("Cannot understand" in pynetdicom's table): a refusal
# of this content, which a resend cannot cure, unlike A7xx (resources: retry later) and
# A9xx (it does not say "wrong SOP class"); 0x0110 "Processing failure" would read as
# our own fault. C230/C231 sit beside the node's other Cxxx codes.
STATUS_SERIES_IN_OTHER_STUDY = 0xC230
STATUS_STUDY_OF_OTHER_PATIENT = 0xC231
# PS3.7 Annex C general status 0x0111 "Duplicate SOP Instance" (a failure; pynetdicom:
# "Duplication SOP Instance"): the SOP Instance UID is already stored with other content
# or under another study, series or patient. A true duplicate is acknowledged with 0x0000.
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111
#: pynetdicom's own association limit, set out of the way (see ``_make_ae``).
_UNCOUNTED = 1_000_000

_REJECTION_STATUS = {
    "undecodable": STATUS_CANNOT_UNDERSTAND,
    "truncated": STATUS_CANNOT_UNDERSTAND,
    "invalid_image": STATUS_CANNOT_UNDERSTAND,
    "missing_uid": STATUS_MISSING_UID,
    "sop_mismatch": STATUS_DATASET_MISMATCH,
    "series_in_other_study": STATUS_SERIES_IN_OTHER_STUDY,
    "study_of_other_patient": STATUS_STUDY_OF_OTHER_PATIENT,
    "sop_conflict": STATUS_DUPLICATE_SOP_INSTANCE,
}

#: Why an association was rejected, by the A-ASSOCIATE-RJ's (source, diagnostic) (PS3.8 9.3.4).
_REJECTION_REASONS: dict[tuple[int | None, int | None], str] = {
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x02, 0x01): "user identity not accepted",
    (0x03, 0x02): "local limit exceeded",
}

#: Storage classes a CT study carries; the node keeps these and refuses the rest.
CT_STUDY_SOP_CLASSES: frozenset[str] = frozenset({
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.200.2",  # CT Performed Procedure Protocol
    "1.2.840.10008.5.1.4.1.1.66",  # Raw Data
})


class ReceiveFile:
    """Where pynetdicom writes one received data set: a file in ``spool/tmp``, or nowhere.

    pynetdicom's chunked receive writes each C-STORE data set into
    ``tempfile.NamedTemporaryFile`` as its fragments arrive, on the association's network
    thread: a full disk (ENOSPC) raised there and ended the association without an
    answer, leaving the partial file behind, and the disk reserve was checked only once
    the whole data set was on disk. This stands in for that file while a node listens
    (``install_receive_files``): the reserve is checked before anything is written (below
    it, nothing is), and a write error is kept, not raised: the partial file is removed
    at once, later fragments are dropped, and the C-STORE handler answers 0xA700.

    Parameters
    ----------
    spool : Spool
        Where the file goes (``spool.tmp_dir``) and whose reserve applies.
    """

    def __init__(self, spool: Spool) -> None:
        self.error: OSError | None = None
        self.begun = False   # a store took the file over (InstanceStore.begin_store)
        self._lock = threading.Lock()
        self._fd = -1
        try:
            spool.check_reserve()
            self._fd, self.name = tempfile.mkstemp(suffix=".dcm", dir=spool.tmp_dir)
        except OSError as exc:   # SpoolFullError included
            self.error = exc
            self.name = str(spool.tmp_dir / f"{uuid.uuid4().hex}.refused")

    @property
    def file(self) -> ReceiveFile:
        """pynetdicom flushes ``.file`` after each fragment (nothing is buffered here)."""
        return self

    def write(self, data: bytes) -> int:
        """Write a fragment; after an error, drop it."""
        with self._lock:
            if self._fd >= 0:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(self._fd, view):]
                except OSError as exc:
                    self.error = exc
                    self._remove()
        return len(data)

    def flush(self) -> None:
        """Nothing to flush: each fragment was written as it came."""

    def close(self) -> None:
        """Close the file, leaving it where it is."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def discard(self) -> None:
        """Close and remove the file (a data set no store took over)."""
        with self._lock:
            self._remove()

    def _remove(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.name)


def install_receive_files(spool: Spool, on_created: Callable[[ReceiveFile], None] | None = None,
                          ) -> Callable[[], None]:
    """Make pynetdicom's chunked receive write into ``ReceiveFile`` objects on ``spool``.

    pynetdicom creates the file with ``NamedTemporaryFile(delete=False, mode="wb",
    suffix=".dcm")``, looked up in its ``dimse_messages`` module (its only use there); the
    name is replaced there while a node listens, as ``direct_encoding`` does for the file
    meta. One node per process, as for ``STORE_RECV_CHUNKED_DATASET`` itself.

    Parameters
    ----------
    spool : Spool
        Where received data sets go and whose reserve applies.
    on_created : callable, optional
        Called with each new file, on the association's network thread (the node keeps
        them per association to remove those no store took over when it ends).

    Returns
    -------
    callable
        Puts pynetdicom's ``NamedTemporaryFile`` back.
    """
    original = dimse_messages.NamedTemporaryFile

    def receive_file(*args: Any, **kwargs: Any) -> ReceiveFile:
        file = ReceiveFile(spool)
        if on_created is not None:
            on_created(file)
        return file

    dimse_messages.NamedTemporaryFile = receive_file  # type: ignore[assignment]

    def uninstall() -> None:
        dimse_messages.NamedTemporaryFile = original  # type: ignore[misc]

    return uninstall


# PS3.8 states in which an A-ABORT request is valid: the request is in (Sta3), the
# association is up (Sta6) or being released (Sta7-Sta12).
_ABORTABLE_STATES = frozenset({"Sta3", "Sta6", "Sta7", "Sta8", "Sta9", "Sta10", "Sta11",
                               "Sta12"})


def _state(assoc: Any) -> str:
    """The association's PS3.8 state ("" once its DUL is gone)."""
    machine = getattr(getattr(assoc, "dul", None), "state_machine", None)
    return str(getattr(machine, "current_state", ""))


#: Failed TLS handshakes from one address are logged at most this often.
HANDSHAKE_LOG_INTERVAL_S = 60.0


def _log_unanswered(path: Path, future: Future[StoreOutcome]) -> None:
    """An early store whose association ended before its answer: say how it ended.

    A store that failed left its received file for the answer to remove: remove it.
    """
    exc = future.exception()
    if exc is not None:
        Spool.discard(path)
        log.warning("instance.unanswered_store_failed", extra=fields(error=type(exc).__name__))
    else:
        outcome = future.result()
        log.info("instance.stored_unanswered", extra=fields(sop=outcome.sop_uid,
                                                            study=outcome.study_uid))


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


class StorageSCP:
    """The listening AE of one node.

    Parameters
    ----------
    settings : Settings
        AE title, ports (plain and TLS), bind address, limits, allow-list.
    store : InstanceStore
        Where received instances go.
    on_released : callable, optional
        Called with the study UIDs an association carried, after it is released.
    accepted_sop_classes : iterable of str, optional
        Storage classes to keep; default ``CT_STUDY_SOP_CLASSES``.
    metrics : NodeMetrics, optional
        Where receipts and refusals are counted (default: a registry of its own).
    """

    def __init__(
        self,
        settings: Settings,
        store: InstanceStore,
        on_released: Callable[[set[str]], Any] | None = None,
        accepted_sop_classes: Iterable[str] | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or NodeMetrics()
        self._handshake_log = LogLimit(HANDSHAKE_LOG_INTERVAL_S)
        self.store = store
        self.on_released = on_released
        self.accepted = frozenset(accepted_sop_classes or CT_STUDY_SOP_CLASSES)
        self._assoc_studies: dict[int, set[str]] = {}
        self._assoc_counts: dict[int, Counter[str]] = {}
        self._lock = threading.Lock()
        self._server: ListenerServer | None = None       # plain DICOM
        self._tls_server: ListenerServer | None = None   # DICOM TLS
        self._previous_receive: tuple[bool, Callable[[], None]] | None = None
        self._meta_installed = False
        # stores begun as a dataset's last fragment arrived: path -> (association, future)
        self._early: dict[str, tuple[int, Future[StoreOutcome]]] = {}
        self._receiving: dict[int, list[ReceiveFile]] = {}   # per association
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        # The listener counts associations itself (transport.py); pynetdicom's count is of
        # every connection's thread, including those that never sent a request.
        ae.maximum_associations = _UNCOUNTED
        ae.maximum_pdu_size = s.max_pdu
        ae.network_timeout = s.network_timeout_s
        ae.acse_timeout = s.association_timeout_s  # also the ARTIM timer
        ae.dimse_timeout = s.network_timeout_s
        if s.allowed_calling_aets is not None:
            ae.require_calling_aet = list(s.allowed_calling_aets)
        ae.require_called_aet = s.require_called_aet
        ae.add_supported_context(VERIFICATION, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    @property
    def handlers(self) -> list[Any]:
        """Event handlers bound by ``start``."""
        return [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ] + ([(evt.EVT_DIMSE_RECV, self._on_dimse_recv)] if self.settings.chunked_receive
             else [])

    def start(self) -> None:
        """Listen in background threads: the plain port, the TLS port, or both.

        Raises
        ------
        ValueError
            A TLS certificate, key or CA file that cannot be loaded.
        """
        s = self.settings
        tls_context = server_context(s.tls) if s.tls is not None else None
        expiry = certificate_expiry(s.tls.certificate) if s.tls is not None else None
        if expiry is not None:
            self.metrics.tls_certificate_expiry.set(expiry)
        if s.chunked_receive:
            # pynetdicom then writes each dataset into a file as its fragments arrive; made
            # in the spool's tmp/ (ReceiveFile), it is renamed into place without a copy.
            # Both settings are per process: one node per process.
            self._previous_receive = (_config.STORE_RECV_CHUNKED_DATASET,
                                      install_receive_files(self.store.spool,
                                                            self._track_receive_file))
            _config.STORE_RECV_CHUNKED_DATASET = True
            self._meta_installed = s.direct_encoding and direct_encoding.install_file_meta()
        limits = ConnectionLimits.from_settings(s)
        slots = AssociationSlots()   # one count of associations over both ports
        try:
            if s.port is not None:
                self._server = start_listener(
                    self.ae, (s.bind_address, s.port), self.handlers, limits,
                    on_rejected=self.audit_rejection, on_ended=self._on_ended, slots=slots)
                log.info("scp.listening", extra=fields(
                    ae_title=s.ae_title, address=s.bind_address, port=self.port))
            if s.tls is not None:
                self._tls_server = start_listener(
                    self.ae, (s.bind_address, s.tls.port), self.handlers, limits,
                    on_rejected=self.audit_rejection, on_ended=self._on_ended, slots=slots,
                    ssl_context=tls_context, on_handshake_failed=self.audit_handshake_failure)
                log.info("scp.listening_tls", extra=fields(
                    ae_title=s.ae_title, address=s.bind_address, port=self.tls_port,
                    client_certificate="required" if s.tls.require_client_certificate
                    else "checked if sent" if s.tls.ca_certificates else "not asked"))
        except BaseException:
            self.stop()
            raise

    @property
    def port(self) -> int | None:
        """The plain DICOM port actually bound (useful with port 0); None without one."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The DICOM TLS port actually bound; None without TLS."""
        if self._tls_server is None:
            return self.settings.tls.port if self.settings.tls is not None else None
        return int(self._tls_server.server_address[1])

    @property
    def listening(self) -> bool:
        """Whether a listening port is open (plain or TLS)."""
        return self._server is not None or self._tls_server is not None

    @property
    def open_associations(self) -> int:
        """Associations established on the listening ports right now."""
        servers = [server for server in (self._server, self._tls_server) if server is not None]
        return sum(1 for server in servers for assoc in list(server.active_associations)
                   if assoc.is_established)

    def stop(self) -> None:
        """Stop listening and close open associations."""
        servers = [server for server in (self._server, self._tls_server) if server is not None]
        self._server = self._tls_server = None
        for server in servers:
            server.shutdown()        # no new associations
        established = []
        for server in servers:
            for assoc in server.active_associations:
                # By the DUL's state, not is_established: pynetdicom sets that flag only
                # after its accept handlers ran, while the peer may be sending already.
                if assoc.is_established or _state(assoc) in _ABORTABLE_STATES:
                    assoc.abort()    # nothing in flight is acknowledged after this
                    established.append(assoc)
                else:                # never associated, or already ending: no data in flight
                    server.close_connection(assoc)
        for assoc in established:
            assoc.join(timeout=10)   # its partial file is removed as its thread ends
        if self._previous_receive is not None:
            _config.STORE_RECV_CHUNKED_DATASET, uninstall = self._previous_receive
            uninstall()
            self._previous_receive = None
            if self._meta_installed:
                direct_encoding.uninstall_file_meta()
                self._meta_installed = False

    # --- handlers ---------------------------------------------------------------------

    def _on_accepted(self, event: Any) -> None:
        # Answer each C-STORE at once: no Nagle delay on our small responses, and a
        # shorter idle poll in pynetdicom's DUL loop (1 ms by default) while data flows.
        try:
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            event.assoc.dul._run_loop_delay = self.settings.dul_poll_s
        except (AttributeError, OSError):
            log.debug("scp.tuning_unavailable")
        if self.settings.direct_encoding:
            direct_encoding.install_store_response(event.assoc)
        log.debug("association.accepted", extra=fields(
            calling_aet=event.assoc.requestor.ae_title, address=event.assoc.requestor.address))

    def _on_rejected(self, event: Any) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        answer = assoc.acceptor.primitive
        reason = _REJECTION_REASONS.get(
            (getattr(answer, "result_source", None), getattr(answer, "diagnostic", None)),
            "rejected")
        self.audit_rejection(assoc.requestor.ae_title, assoc.requestor.address, reason,
                             str(getattr(request, "called_ae_title", "") or ""))

    def audit_rejection(self, calling: str, address: str, reason: str, called: str) -> None:
        """Log and audit an association refused at set-up (AE titles only, no patient data).

        Parameters
        ----------
        calling, called : str
            The calling and called AE titles of the request.
        address : str
            The peer's IP address.
        reason : str
            Why, as the A-ASSOCIATE-RJ says it.
        """
        log.warning("association.rejected", extra=fields(
            calling_aet=calling, called_aet=called, address=address, reason=reason))
        try:
            with self.store.db.transaction() as session:
                session.add(AuditEvent(event="association.rejected", calling_aet=calling[:16],
                                       detail={"address": address, "reason": reason,
                                               "called_aet": called[:16]}))
        except SQLAlchemyError:
            log.exception("audit.failed")

    def audit_handshake_failure(self, address: str, reason: str) -> None:
        """Log and audit a connection to the TLS port whose handshake failed.

        Parameters
        ----------
        address : str
            The peer's IP address.
        reason : str
            Why, in OpenSSL's words (a certificate not trusted, no certificate, not TLS,
            no handshake in time).

        Each failure is counted; the log line and audit row come at most once per
        ``HANDSHAKE_LOG_INTERVAL_S`` per address, the next one saying how many were left
        out (a scanner or a misconfigured modality retrying would fill both).
        """
        self.metrics.tls_handshake_failures.inc()
        suppressed = self._handshake_log.admit(address)
        if suppressed is None:   # logged and audited for this address a moment ago
            return
        log.warning("tls.handshake_failed", extra=fields(address=address, reason=reason,
                                                         **({"suppressed": suppressed}
                                                            if suppressed else {})))
        try:
            with self.store.db.transaction() as session:
                session.add(AuditEvent(event="tls.handshake_failed", calling_aet="",
                                       detail={"address": address, "reason": reason,
                                               "suppressed": suppressed}))
        except SQLAlchemyError:
            log.exception("audit.failed")

    def _on_dimse_recv(self, event: Any) -> None:
        # Runs on pynetdicom's DUL thread the moment a message's last fragment is in its
        # file; the association thread takes the request up on its next poll (up to 1 ms
        # later) and only then calls _on_store. Checking, flushing and indexing start
        # here, and _on_store answers when they are done: the same order and the same
        # "acknowledged once committed", with pynetdicom's poll no longer in the way.
        message = event.message
        received = getattr(message, "_data_set_file", None)
        name = getattr(received, "name", None)
        command = getattr(message, "command_set", None)
        if not isinstance(name, str) or command is None:
            return
        if isinstance(received, ReceiveFile) and received.error is not None:
            return  # not on disk (reserve, disk full): _on_store refuses it
        try:
            sop_class = str(command.AffectedSOPClassUID or "")
            sop_uid = str(command.AffectedSOPInstanceUID or "")
            calling = event.assoc.requestor.ae_title
        except AttributeError:
            return
        if sop_class not in self.accepted:
            return  # _on_store refuses it, if pynetdicom gets that far; else _on_ended
        if isinstance(received, ReceiveFile):
            received.begun = True
        future = self.store.begin_store(Path(name), calling, expected_sop_uid=sop_uid,
                                        expected_sop_class_uid=sop_class)
        with self._lock:
            self._early[name] = (id(event.assoc), future)

    def _take_early(self, event: Any) -> Future[StoreOutcome] | None:
        if not self._early:
            return None
        try:
            name = str(event.dataset_path)
        except (AttributeError, TypeError):
            return None
        with self._lock:
            entry = self._early.pop(name, None)
        return entry[1] if entry is not None else None

    def _on_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def _count(self, event: Any, what: str) -> None:
        with self._lock:
            self._assoc_counts.setdefault(id(event.assoc), Counter())[what] += 1

    def _refuse(self, event: Any, code: int, what: str, reason: str, sop_uid: str) -> Dataset:
        self._count(event, "refused")
        self.metrics.instances_refused.labels(what).inc()
        log.warning("instance.refused", extra=fields(
            sop=sop_uid, status=f"0x{code:04X}", what=what, reason=reason,
            calling_aet=event.assoc.requestor.ae_title))
        return _status(code, reason)

    def _on_store(self, event: Any) -> Dataset | int:
        request = event.request
        early = self._take_early(event)
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        sop_class = str(request.AffectedSOPClassUID or "")
        if sop_class not in self.accepted:
            return self._refuse(event, STATUS_SOP_CLASS_NOT_SUPPORTED, "sop_class",
                                f"SOP class {sop_class} not accepted", sop_uid)
        calling = event.assoc.requestor.ae_title
        received = getattr(request, "_dataset_file", None)
        try:
            if isinstance(received, ReceiveFile) and received.error is not None:
                raise received.error  # refused before it was written, or the disk filled
            if early is not None:  # begun by _on_dimse_recv
                outcome = early.result()
            elif self._previous_receive is not None:  # chunked: already a file in spool/tmp
                outcome = self.store.store_file(
                    Path(event.dataset_path), calling, expected_sop_uid=sop_uid,
                    expected_sop_class_uid=sop_class,
                )
            else:
                outcome = self.store.store(
                    event.encoded_dataset(), calling, expected_sop_uid=sop_uid,
                    expected_sop_class_uid=sop_class,
                )
        except InstanceRejectedError as exc:
            return self._refuse(event, _REJECTION_STATUS.get(exc.code, STATUS_CANNOT_UNDERSTAND),
                                exc.code, exc.comment, sop_uid)
        except SpoolFullError as exc:
            return self._refuse(event, STATUS_OUT_OF_RESOURCES, "disk_reserve",
                                exc.strerror or str(exc), sop_uid)
        except OSError as exc:
            code = STATUS_OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
                else STATUS_CANNOT_STORE
            return self._refuse(event, code, "os_error", f"{exc.strerror or exc}", sop_uid)
        except Exception as exc:  # the index or anything else: fail this one, keep serving
            log.exception("instance.store_failed", extra=fields(sop=sop_uid))
            return self._refuse(event, STATUS_CANNOT_STORE, "internal",
                                f"{type(exc).__name__}", sop_uid)
        with self._lock:
            self._assoc_studies.setdefault(id(event.assoc), set()).add(outcome.study_uid)
            self._assoc_counts.setdefault(id(event.assoc), Counter())[
                "duplicate" if outcome.duplicate else "stored"] += 1
        self.metrics.instances_received.labels("true" if outcome.duplicate else "false").inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("instance.stored", extra=fields(
                sop=outcome.sop_uid, study=outcome.study_uid, duplicate=outcome.duplicate))
        return STATUS_SUCCESS

    def _finish(self, assoc: Any, how: str) -> set[str]:
        with self._lock:
            studies = self._assoc_studies.pop(id(assoc), set())
            counts = self._assoc_counts.pop(id(assoc), Counter())
            dropped = [k for k, (a, _) in self._early.items() if a == id(assoc)]
            futures = [(name, self._early.pop(name)[1]) for name in dropped]
        for name, future in futures:  # begun, never answered: the sender was not told success
            future.add_done_callback(functools.partial(_log_unanswered, Path(name)))
        if counts or how != "released":
            log.info(f"association.{how}", extra=fields(
                calling_aet=assoc.requestor.ae_title, studies=len(studies),
                stored=counts["stored"], duplicates=counts["duplicate"],
                refused=counts["refused"]))
        return studies

    def _track_receive_file(self, file: ReceiveFile) -> None:
        # pynetdicom makes the file on the association's DUL thread, which knows its
        # association. A message it drops after decoding (an unknown SOP class in the
        # command, an abort between decoding and the handler) is in neither its current
        # message nor its queue any more: this list still has its file.
        assoc = getattr(threading.current_thread(), "assoc", None)
        if assoc is None:
            return
        with self._lock:
            files = self._receiving.setdefault(id(assoc), [])
            files[:] = [f for f in files if not f.begun]
            files.append(file)

    def _on_ended(self, assoc: Any) -> None:
        """An association's thread has ended: finish it if pynetdicom never said it did,
        and remove the files of data sets it was receiving or never handed to a store."""
        key = id(assoc)
        with self._lock:
            unfinished = (key in self._assoc_counts or key in self._assoc_studies
                          or any(a == key for a, _ in self._early.values()))
        if unfinished:
            self._finish(assoc, "aborted")
        dimse = assoc.dimse
        received = [getattr(dimse.message, "_data_set_file", None)]
        received += [getattr(primitive, "_dataset_file", None)
                     for _, primitive in list(dimse.msg_queue.queue)]
        with self._lock:
            received += self._receiving.pop(key, [])
        for file in received:
            if isinstance(file, ReceiveFile) and not file.begun:
                file.discard()

    def _on_released(self, event: Any) -> None:
        studies = self._finish(event.assoc, "released")
        if studies and self.on_released is not None:
            try:
                self.on_released(studies)
            except Exception:
                log.exception("completion.release_check_failed")

    def _on_aborted(self, event: Any) -> None:
        # An aborted association may have cut a study short: only the quiet period completes it.
        self._finish(event.assoc, "aborted")

