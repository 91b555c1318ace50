"""C-STORE-RSP command sets encoded directly, without building pydicom datasets.

pynetdicom turns every response primitive into a DIMSE message by filling a pydicom
``Dataset`` and encoding it twice (once to measure the command group length, once to
send): ~0.35 ms of the association thread per C-STORE, on the path between the durable
commit and the acknowledgement the sender waits for. A plain C-STORE-RSP is six
fixed elements in Implicit VR Little Endian (PS3.7 9.3.1.2, E.1), so the node writes
those bytes itself; anything else (an error comment, an offending element, a missing
UID, an observer of pynetdicom's ``EVT_DIMSE_SENT``) takes pynetdicom's own path.
The bytes are identical to pynetdicom's (tested).
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom import _handlers, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

#: Message control header of a PDV holding a whole command set (PS3.8 E.2).
_LAST_COMMAND_FRAGMENT = b"\x03"
#: Room the P-DATA-TF PDV item takes besides its value (length, context ID, header).
_PDV_OVERHEAD = 6
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101


def _element(element: int, value: bytes) -> bytes:
    """One command element (group 0000) in Implicit VR Little Endian."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(uid: str) -> bytes:
    """A UI value padded to even length with NUL (PS3.5 9.1)."""
    value = uid.encode("ascii")
    return value + b"\x00" if len(value) % 2 else value


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
        _element(0x0002, _uid(sop_class)),
        _element(0x0100, struct.pack("<H", _C_STORE_RSP)),
        _element(0x0120, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", _NO_DATA_SET)),
        _element(0x0900, struct.pack("<H", status)),
        _element(0x1000, _uid(sop_instance)),
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _only_standard_observers(assoc: Any) -> bool:
    """Whether nothing but pynetdicom's logging handler (silent for C-STORE-RSP) is
    bound to ``EVT_DIMSE_SENT``, so not triggering it for a plain response loses
    nothing."""
    return all(handler[0] is _handlers.standard_dimse_sent_handler
               for handler in assoc.get_handlers(evt.EVT_DIMSE_SENT))


def install(assoc: Any) -> None:
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
