"""Two per-instance encodings of pynetdicom's written directly, without pydicom datasets.

pynetdicom builds both through pydicom datasets on the ingest path of every instance:

- the C-STORE-RSP command set, filled into a ``Dataset`` and encoded twice (once to
  measure the command group length, once to send): ~0.35 ms of the association thread
  per C-STORE, between the durable commit and the acknowledgement the sender waits for;
- with ``STORE_RECV_CHUNKED_DATASET``, the File Meta Information group at the head of
  each received file, built as a ``FileMetaDataset`` and written by
  ``pydicom.filewriter.write_file_meta_info``: ~0.3 ms of the DUL thread that reads the
  socket.

A plain C-STORE-RSP is six fixed elements in Implicit VR Little Endian (PS3.7 9.3.1.2,
E.1); the File Meta group is seven in Explicit VR Little Endian (PS3.10 7.1). The node
writes those bytes itself, identical to pynetdicom's and pydicom's (tested). Anything
else goes back to them: a response with an error comment, an offending element or a
missing UID, an observer of pynetdicom's ``EVT_DIMSE_SENT``, a file-meta value that is
missing or not ASCII. The response encoder is installed per association (the node's own
SCU associations keep pynetdicom's path); the file-meta one replaces the two names
pynetdicom's message decoder looks up in its own module, while a node's listener runs,
and is restored when it stops. ``Settings.direct_encoding`` turns both off.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _handlers,
    dimse_messages,
    evt,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA


def _padded(value: str, pad: bytes) -> bytes:
    """An ASCII value padded to even length (UI with NUL, text with a space; PS3.5 6.2)."""
    data = value.encode("ascii")
    return data + pad if len(data) % 2 else data


# --- C-STORE-RSP --------------------------------------------------------------------

#: Message control header of a PDV holding a whole command set (PS3.8 E.2).
_LAST_COMMAND_FRAGMENT = b"\x03"
#: Room the P-DATA-TF PDV item takes besides its value (length, context ID, header).
_PDV_OVERHEAD = 6
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101


def _element(element: int, value: bytes) -> bytes:
    """One command element (group 0000) in Implicit VR Little Endian."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def encode_store_response(primitive: Any) -> bytes | None:
    """The command set of a plain C-STORE-RSP, or None when it needs pynetdicom's path.

    Parameters
    ----------
    primitive : pynetdicom.dimse_primitives.C_STORE
        A response primitive (``MessageIDBeingRespondedTo`` and ``Status`` set).

    Returns
    -------
    bytes or None
        The encoded command set (group length first), or None for a request, a
        response carrying an error comment or offending element, or a missing UID.
    """
    if type(primitive) is not C_STORE:
        return None
    message_id = primitive.MessageIDBeingRespondedTo
    status = primitive.Status
    sop_class = primitive.AffectedSOPClassUID
    sop_instance = primitive.AffectedSOPInstanceUID
    if (message_id is None or status is None or sop_class is None or sop_instance is None
            or primitive.ErrorComment is not None or primitive.OffendingElement is not None):
        return None
    body = b"".join((
        _element(0x0002, _padded(sop_class, b"\x00")),
        _element(0x0100, struct.pack("<H", _C_STORE_RSP)),
        _element(0x0120, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", _NO_DATA_SET)),
        _element(0x0900, struct.pack("<H", status)),
        _element(0x1000, _padded(sop_instance, b"\x00")),
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _only_standard_observers(assoc: Any) -> bool:
    """Whether nothing but pynetdicom's logging handler (silent for C-STORE-RSP) is
    bound to ``EVT_DIMSE_SENT``, so not triggering it for a plain response loses
    nothing."""
    return all(handler[0] is _handlers.standard_dimse_sent_handler
               for handler in assoc.get_handlers(evt.EVT_DIMSE_SENT))


def install_store_response(assoc: Any) -> None:
    """Send this association's plain C-STORE responses through :func:`encode_store_response`.

    Only the given association's DIMSE provider is changed (pynetdicom's classes are
    left alone: the node's own SCU associations and other users in the process keep
    the standard path).
    """
    dimse = assoc.dimse
    standard = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        command = encode_store_response(primitive)
        limit = dimse.maximum_pdu_size
        if (command is None or (limit and len(command) + _PDV_OVERHEAD > limit)
                or not _only_standard_observers(assoc)):
            standard(primitive, context_id)
            return
        pdata = P_DATA()
        # pynetdicom checks for [ID, PDV] lists at run time (its annotation says tuples)
        pdata.presentation_data_value_list = [
            [context_id, _LAST_COMMAND_FRAGMENT + command]]  # type: ignore[list-item]
        dimse.dul.send_pdu(pdata)

    dimse.send_msg = send_msg


# --- File Meta Information of chunked receives ------------------------------------

_GROUP = 0x0002


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    """An element with a 2-byte length (UI, SH, UL) in Explicit VR Little Endian."""
    return struct.pack("<HH", _GROUP, element) + vr + struct.pack("<H", len(value)) + value


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                     implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
                     implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION) -> bytes:
    """The File Meta Information group (after preamble and ``DICM``) pynetdicom writes.

    Parameters
    ----------
    sop_class_uid, sop_instance_uid, transfer_syntax : str
        Media Storage SOP Class/Instance UID and Transfer Syntax UID.
    implementation_uid, implementation_version : str
        Implementation Class UID and Version Name (pynetdicom's by default).

    Returns
    -------
    bytes
        Group length, version, the five values; UIDs padded with NUL, the version name
        with a space, as pydicom pads them.

    Raises
    ------
    UnicodeEncodeError
        A value that is not ASCII.
    """
    body = b"".join((
        struct.pack("<HH", _GROUP, 0x0001) + b"OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01",
        _short(0x0002, b"UI", _padded(str(sop_class_uid), b"\x00")),
        _short(0x0003, b"UI", _padded(str(sop_instance_uid), b"\x00")),
        _short(0x0010, b"UI", _padded(str(transfer_syntax), b"\x00")),
        _short(0x0012, b"UI", _padded(str(implementation_uid), b"\x00")),
        _short(0x0013, b"SH", _padded(str(implementation_version), b" ")),
    ))
    return _short(0x0000, b"UL", struct.pack("<I", len(body))) + body


class _Encoded(bytes):
    """File meta already encoded (what the replaced ``create_file_meta`` returns)."""


_NAMES = ("create_file_meta", "write_file_meta_info")
_saved: dict[str, Any] | None = None


def install_file_meta() -> bool:
    """Replace pynetdicom's file-meta builder and writer for chunked receives.

    Returns
    -------
    bool
        False (nothing changed) when this pynetdicom does not look up those names in
        its message decoder, or when they are replaced already.
    """
    global _saved
    if _saved is not None or not all(hasattr(dimse_messages, n) for n in _NAMES):
        return False
    create: Callable[..., Any] = dimse_messages.create_file_meta
    write: Callable[..., Any] = dimse_messages.write_file_meta_info

    def create_file_meta(*args: Any, **values: Any) -> Any:
        if any(value is None for value in (*args, *values.values())):
            return create(*args, **values)  # a request without a UID: pydicom's empty value
        try:
            return _Encoded(encode_file_meta(*args, **values))
        except (UnicodeEncodeError, TypeError):
            return create(*args, **values)

    def write_file_meta_info(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file_meta, _Encoded):
            fp.write(file_meta)
            return None
        return write(fp, file_meta, *args, **kwargs)

    _saved = {"create_file_meta": create, "write_file_meta_info": write}
    dimse_messages.create_file_meta = create_file_meta  # type: ignore[assignment]
    dimse_messages.write_file_meta_info = write_file_meta_info  # type: ignore[assignment]
    return True


def uninstall_file_meta() -> None:
    """Put pynetdicom's own functions back (no-op when not installed)."""
    global _saved
    if _saved is None:
        return
    for name, function in _saved.items():
        setattr(dimse_messages, name, function)
    _saved = None
