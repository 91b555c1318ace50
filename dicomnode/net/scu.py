"""C-STORE SCU: send files to a DICOM peer (used by the export outbox)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.presentation import build_context

from dicomnode.logs import fields

log = logging.getLogger(__name__)


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
        Connection, ACSE and DIMSE timeout.

    Returns
    -------
    SendResult

    Raises
    ------
    SendError
        The association was refused, aborted or not established.
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
    assoc = ae.associate(host, port, contexts=requested, ae_title=called_aet)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise SendError(f"association with {called_aet}@{host}:{port} {reason}")
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
