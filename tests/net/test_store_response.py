"""C-STORE-RSP command sets written directly: the same bytes as pynetdicom's, on the wire
too (pynetdicom and dcmtk peers)."""

from __future__ import annotations

import subprocess
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import CTImageStorage

from dicomnode.config import Settings
from dicomnode.net.direct_encoding import encode_store_response
from dicomnode.node import Node
from tests.factories import ct_slice, write_series


def _response(message_id: int = 1, status: int = 0, sop_class: str | None = CTImageStorage,
              sop_instance: str | None = "1.2.3.4") -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.Status = status
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    return primitive


def _pynetdicom_bytes(primitive: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xB000, 0xC210])
@pytest.mark.parametrize("message_id", [1, 2, 255, 256, 65535])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45", generate_uid(), "9" * 64])
def test_bytes_equal_pynetdicoms(status: int, message_id: int, sop_instance: str) -> None:
    primitive = _response(message_id, status, sop_instance=sop_instance)
    assert encode_store_response(primitive) == _pynetdicom_bytes(primitive)


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7"])
def test_odd_and_even_sop_class_uids(sop_class: str) -> None:
    primitive = _response(sop_class=sop_class)
    assert encode_store_response(primitive) == _pynetdicom_bytes(primitive)


def test_responses_that_need_pynetdicom_are_left_to_it() -> None:
    with_comment = _response(status=0xC210)
    with_comment.ErrorComment = "cannot understand"
    with_element = _response(status=0xA900)
    with_element.OffendingElement = [0x00080018]
    request = C_STORE()
    request.MessageID = 1
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 1
    echo.Status = 0
    for primitive in (with_comment, with_element, request, echo, _response(sop_class=None),
                      _response(sop_instance=None)):
        assert encode_store_response(primitive) is None


@pytest.mark.parametrize("fast", [True, False])
def test_peers_read_the_same_responses_either_way(settings: Settings, tmp_path: Path,
                                                  fast: bool) -> None:
    """Success, duplicate and refusal, with the direct encoding on and off: pynetdicom
    decodes identical statuses and identities; dcmtk storescu accepts the answers."""
    node = Node(settings.model_copy(update={"direct_encoding": fast}))
    node.start()
    sent: list[bytes] = []
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title=settings.ae_title,
                             evt_handlers=[(evt.EVT_DATA_RECV,
                                            lambda event: sent.append(bytes(event.data)))])
        assert assoc.is_established
        study, series = generate_uid(), generate_uid()
        ds = ct_slice(study, series, 0.0, 0)
        first = assoc.send_c_store(ds, msg_id=1)
        again = assoc.send_c_store(ds, msg_id=2)
        missing = ct_slice(study, series, 1.0, 1)
        del missing.StudyInstanceUID
        refused = assoc.send_c_store(missing, msg_id=3)
        assoc.release()
        assert (first.Status, again.Status) == (0x0000, 0x0000)
        assert refused.Status == 0xC220
        assert "ErrorComment" in refused
        out = subprocess.run(["storescu", "-aec", settings.ae_title, "127.0.0.1",
                              str(node.scp.port),
                              *map(str, write_series(tmp_path / "in", 3))],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    finally:
        node.stop()
    # each answer is one P-DATA-TF with one PDV: the whole command set
    commands = [decode(BytesIO(data[12:]), True, True) for data in sent if data[:1] == b"\x04"]
    assert len(commands) == 3
    for command, message_id in zip(commands, (1, 2, 3), strict=True):
        assert command.CommandField == 0x8001
        assert command.MessageIDBeingRespondedTo == message_id
        assert command.AffectedSOPClassUID == CTImageStorage
        assert command.CommandDataSetType == 0x0101
    assert [c.Status for c in commands] == [0x0000, 0x0000, 0xC220]
    assert commands[0].AffectedSOPInstanceUID == ds.SOPInstanceUID
    assert commands[1].AffectedSOPInstanceUID == ds.SOPInstanceUID
    for command in commands[:2]:
        plain = _response(command.MessageIDBeingRespondedTo, 0, sop_instance=ds.SOPInstanceUID)
        assert encode(command, True, True) == _pynetdicom_bytes(plain)


def test_an_observer_of_sent_messages_still_sees_every_response(node: Node) -> None:
    """Someone who binds EVT_DIMSE_SENT gets pynetdicom's path, event included."""
    seen: list[str] = []
    assert node.scp._server is not None
    node.scp._server.bind(evt.EVT_DIMSE_SENT,
                          lambda event: seen.append(type(event.message).__name__))
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title=node.settings.ae_title)
    assert assoc.is_established
    assert assoc.send_c_store(ct_slice(generate_uid(), generate_uid(), 0.0, 0)).Status == 0
    assoc.release()
    assert seen == ["C_STORE_RSP"]
