"""A raw DICOM peer for tests: the bytes a sender puts on the wire, one by one if need be."""

from __future__ import annotations

import socket
import struct
import time

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage

from dicomnode.node import Node

RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def associate_rq(called: str = "DICOMNODE", calling: str = "RAWSCU") -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing CT Image Storage (context 1), explicit VR LE."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    context = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16382
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.9999"
    primitive.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV."""
    pdv = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def command(*elements: tuple[int, bytes]) -> bytes:
    """A command set (group 0000, implicit VR LE) with its group length."""
    body = b"".join(struct.pack("<HHL", 0, el, len(v)) + v for el, v in elements)
    return struct.pack("<HHL", 0, 0, 4) + struct.pack("<L", len(body)) + body


def us(value: int) -> bytes:
    return struct.pack("<H", value)


STORE_RQ = command((0x0002, b"1.2.840.10008.5.1.4.1.1.2\x00"), (0x0100, us(0x0001)),
                   (0x0110, us(1)), (0x0700, us(0)), (0x0800, us(0)),
                   (0x1000, b"1.2.3.4.5\x00"))


def raw_association(node: Node, source: str = "127.0.0.1") -> socket.socket:
    """A socket with an association accepted by ``node``."""
    sock = socket.create_connection(("127.0.0.1", node.scp.port), timeout=5,
                                    source_address=(source, 0))
    sock.sendall(associate_rq(node.settings.ae_title))
    answer = sock.recv(65536)
    assert answer[:1] == b"\x02", answer[:12]
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """What the node sends until it closes the connection, and when it closed (seconds)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return data, float("inf")
    return data, time.monotonic() - started


A_ABORT_RQ = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"
