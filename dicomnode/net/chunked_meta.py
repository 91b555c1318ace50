"""File Meta Information of chunked receives written directly, without pydicom datasets.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom starts every received dataset's file
with a File Meta Information group, built as a pydicom ``FileMetaDataset`` and written
by ``pydicom.filewriter.write_file_meta_info``: ~0.3 ms of pynetdicom's DUL thread per
instance, the thread that reads the socket. The group is seven elements in Explicit VR
Little Endian (PS3.10 7.1), so the node writes those bytes itself, identical to
pydicom's (tested); a value it cannot encode as pydicom would (missing, not ASCII) goes
back to pydicom. Only the two names pynetdicom's message decoder looks up in its own
module are replaced, while a node's listener runs, and restored when it stops.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    dimse_messages,
)

_GROUP = 0x0002


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    """An element with a 2-byte length (UI, SH, UL) in Explicit VR Little Endian."""
    return struct.pack("<HH", _GROUP, element) + vr + struct.pack("<H", len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    data = value.encode("ascii")
    return data + pad if len(data) % 2 else data


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


def install() -> bool:
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


def uninstall() -> None:
    """Put pynetdicom's own functions back (no-op when not installed)."""
    global _saved
    if _saved is None:
        return
    for name, function in _saved.items():
        setattr(dimse_messages, name, function)
    _saved = None
