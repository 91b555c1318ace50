"""The listener's connections: limits counted on associations, not on sockets; deadlines
for the association request and for every PDU; a PDU cap, announced and enforced;
malformed input ending one association (A-ABORT, one log line) instead of a thread."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from dicomnode.config import Settings
from dicomnode.net.scp import StorageSCP
from dicomnode.node import Node
from dicomnode.store.models import AuditEvent
from tests.factories import ct_slice
from tests.net.rawpeer import (
    RELEASE_RQ,
    STORE_RQ,
    associate_rq,
    command,
    p_data,
    raw_association,
    read_until_closed,
    us,
)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def pynetdicom_assoc(node: Node, calling: str = "TESTSCU", source: str = "") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.scp.port, ae_title=node.settings.ae_title,
                        bind_address=(source, 0))


def counts(node: Node) -> dict[str, Any]:
    server = node.scp._server
    assert server is not None
    return dict(server.counts)


def idle(node: Node) -> bool:
    return counts(node) == {"associations": 0, "associated": {}, "pending": {}}


@pytest.fixture
def limited(settings: Settings) -> Iterator[Callable[..., Node]]:
    """Start a node with some settings changed."""
    started: list[Node] = []

    def start(**changes: object) -> Node:
        node = Node(settings.model_copy(update=changes))
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Exceptions that escape any thread while the test runs."""
    errors: list[str] = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: errors.append(f"{args.thread}: {args.exc_type.__name__}"))
    return errors


# --- association slots are held by associations, not by sockets -----------------------

def test_connections_that_close_without_a_request_hold_no_association_slot(
        node: Node) -> None:
    for _ in range(node.settings.max_associations + 1):
        socket.create_connection(("127.0.0.1", node.scp.port), timeout=5).close()
    time.sleep(0.3)
    assoc = pynetdicom_assoc(node)
    assert assoc.is_established, "refused after connections that sent nothing"
    assert assoc.send_c_store(ct_slice(generate_uid(), generate_uid(), 0.0, 0)).Status == 0
    assoc.release()


def test_as_many_senders_as_max_associations_get_through_and_one_more_is_rejected(
        limited: Callable[..., Node]) -> None:
    node = limited(max_associations=16, max_associations_per_ip=16)
    silent = socket.create_connection(("127.0.0.1", node.scp.port), timeout=5)  # sends nothing
    assocs = [pynetdicom_assoc(node, calling=f"SENDER{i}") for i in range(16)]
    silent.close()
    try:
        assert [a.is_established for a in assocs] == [True] * 16
        extra = pynetdicom_assoc(node, calling="ONEMORE")
        assert extra.is_rejected
        answer = extra.acceptor.primitive
        assert (answer.result, answer.result_source, answer.diagnostic) == (0x02, 0x03, 0x02)
        assocs[0].release()
        again = pynetdicom_assoc(node, calling="AGAIN")
        assert again.is_established, "a released association's slot was not given back"
        assocs[0] = again
    finally:
        for assoc in assocs:
            assoc.release()
    with node.db.session() as s:
        rows = s.execute(select(AuditEvent).where(
            AuditEvent.event == "association.rejected")).scalars().all()
    assert [(r.calling_aet, (r.detail or {})["reason"]) for r in rows] == [
        ("ONEMORE", "local limit exceeded: 16 associations open (max_associations)")]
    assert wait_for(lambda: idle(node))


def test_one_address_holds_at_most_max_associations_per_ip(
        limited: Callable[..., Node]) -> None:
    node = limited(max_associations_per_ip=2)
    first = [pynetdicom_assoc(node, source="127.0.0.1") for _ in range(2)]
    third = pynetdicom_assoc(node, source="127.0.0.1")
    other = pynetdicom_assoc(node, source="127.0.0.2")
    try:
        assert [a.is_established for a in first] == [True, True]
        assert third.is_rejected and third.acceptor.primitive.diagnostic == 0x02
        assert other.is_established
    finally:
        for assoc in (*first, other):
            assoc.release()
    assert wait_for(lambda: idle(node))


def test_connections_awaiting_association_are_capped_per_address(
        limited: Callable[..., Node]) -> None:
    node = limited(max_associations_per_ip=2, association_timeout_s=5)
    waiting = [socket.create_connection(("127.0.0.1", node.scp.port), timeout=5)
               for _ in range(2)]
    try:
        assert wait_for(lambda: counts(node)["pending"] == {"127.0.0.1": 2})
        refused = socket.create_connection(("127.0.0.1", node.scp.port), timeout=5)
        assert read_until_closed(refused, 2)[1] < 1, "a third waiting connection was kept"
        elsewhere = raw_association(node, source="127.0.0.2")   # another address is served
        elsewhere.sendall(RELEASE_RQ)
        assert read_until_closed(elsewhere, 5)[0][:1] == b"\x06"
    finally:
        for sock in waiting:
            sock.close()
    assert wait_for(lambda: idle(node))


# --- deadlines: the association request, then every PDU ------------------------------

def test_a_connection_that_sends_nothing_is_closed_after_the_association_timeout(
        limited: Callable[..., Node]) -> None:
    node = limited(association_timeout_s=0.5)
    sock = socket.create_connection(("127.0.0.1", node.scp.port), timeout=5)
    _, closed_after = read_until_closed(sock, 5)
    assert closed_after < 2
    assert wait_for(lambda: idle(node))


def test_a_trickled_association_request_is_cut_at_the_association_timeout(
        limited: Callable[..., Node]) -> None:
    node = limited(association_timeout_s=1, pdu_timeout_s=30)
    request = associate_rq()
    sock = socket.create_connection(("127.0.0.1", node.scp.port), timeout=5)
    started = time.monotonic()
    try:
        for byte in request:                 # ~10 s in all, one byte every 50 ms
            sock.sendall(bytes([byte]))
            time.sleep(0.05)
            if time.monotonic() - started > 4:
                break
    except OSError:
        pass                                 # closed by the node: what should happen
    answer, _ = read_until_closed(sock, 3)
    assert time.monotonic() - started < 4, "the trickle was read for as long as it lasted"
    assert answer[:1] != b"\x02", "the trickled request was accepted"


def test_a_trickled_pdu_is_cut_at_the_pdu_timeout_and_frees_its_slot(
        limited: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dicomnode")
    node = limited(pdu_timeout_s=0.5)
    sock = raw_association(node)
    pdu = p_data(1, 3, STORE_RQ)
    started = time.monotonic()
    try:
        for byte in pdu:                     # ~9 s in all
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
            if time.monotonic() - started > 3:
                break
    except OSError:
        pass
    answer, _ = read_until_closed(sock, 3)
    assert time.monotonic() - started < 3, "the trickle was read for as long as it lasted"
    assert answer[:1] == b"\x07", "no A-ABORT before the close"
    assert wait_for(lambda: idle(node))
    assert [r.getMessage() for r in caplog.records] == ["association.pdu_timeout"]


# --- the PDU cap: announced and enforced ----------------------------------------------

def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_the_node_announces_max_pdu(node: Node) -> None:
    assoc = pynetdicom_assoc(node)
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == node.settings.max_pdu == 2**20
    assoc.release()


def test_a_pdu_longer_than_max_pdu_aborts_at_once_without_being_buffered(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dicomnode")
    sock = raw_association(node)
    chunk = b"\x00" * 2**20
    before = _rss_mib()
    sent = 0
    try:
        sock.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF))
        sock.settimeout(10)
        while sent < 256 * 2**20:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass                                 # reset by the node: what should happen
    answer, _ = read_until_closed(sock, 3)
    grown = _rss_mib() - before
    assert sent < 64 * 2**20, f"{sent >> 20} MiB taken before the association ended"
    assert grown < 32, f"the node's memory grew by {grown:.0f} MiB"
    assert answer[:1] in (b"\x07", b""), answer[:12]
    assert wait_for(lambda: idle(node))
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "association.pdu_too_long"


def test_an_association_request_longer_than_the_control_cap_is_refused(node: Node) -> None:
    from dicomnode.net.transport import MAX_CONTROL_PDU

    sock = socket.create_connection(("127.0.0.1", node.scp.port), timeout=5)
    sock.sendall(struct.pack(">BBL", 0x01, 0, MAX_CONTROL_PDU + 1) + b"\x00" * 1000)
    answer, closed_after = read_until_closed(sock, 3)
    assert closed_after < 1
    assert answer[:1] == b"\x07"


def test_datasets_larger_than_max_pdu_arrive_in_pdus_within_it(
        limited: Callable[..., Node], tmp_path: Path) -> None:
    import subprocess

    from tests.factories import write_series

    node = limited(max_pdu=4096)
    assoc = pynetdicom_assoc(node)
    assert assoc.acceptor.maximum_length == 4096
    big = ct_slice(generate_uid(), generate_uid(), 0.0, 0, rows=128, cols=128)  # 32 KiB
    assert assoc.send_c_store(big).Status == 0
    assoc.release()
    out = subprocess.run(["storescu", "-aec", node.settings.ae_title, "127.0.0.1",
                          str(node.scp.port),
                          *map(str, write_series(tmp_path / "in", 3, rows=128, cols=128))],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# --- malformed input ends one association: A-ABORT, one log line, nothing left -------

_MALFORMED = {
    "no_command_field": [p_data(1, 3, command((0x0110, us(1)), (0x0800, us(0x0101))))],
    "unknown_command_field": [p_data(1, 3, command((0x0100, us(0x1234)),
                                                   (0x0800, us(0x0101))))],
    "unaccepted_context": [p_data(99, 3, STORE_RQ),
                           p_data(99, 2, b"\x08\x00\x18\x00UI\x02\x001\x00")],
    "undecodable_command": [p_data(1, 3, b"\xff" * 40)],
}


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_malformed_p_data_ends_the_association_with_an_a_abort(
        node: Node, case: str, caplog: pytest.LogCaptureFixture,
        thread_errors: list[str]) -> None:
    caplog.set_level(logging.DEBUG)
    sock = raw_association(node)
    for pdu in _MALFORMED[case]:
        sock.sendall(pdu)
    answer, closed_after = read_until_closed(sock, 10)
    assert answer[:1] == b"\x07", answer[:12]
    assert closed_after < 10
    assert wait_for(lambda: idle(node))
    assert not thread_errors
    assert not any(r.exc_info for r in caplog.records if r.name.startswith("dicomnode"))
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("dicomnode.net")
            and r.levelno >= logging.WARNING]
    assert ours == ["association.protocol_error"]
    assert wait_for(lambda: not list(node.spool.tmp_dir.iterdir()))
    assoc = pynetdicom_assoc(node)                # the node still serves
    assert assoc.send_c_store(ct_slice(generate_uid(), generate_uid(), 0.0, 0)).Status == 0
    assoc.release()


def test_a_store_whose_command_names_a_garbled_sop_class_leaves_no_file_behind(
        node: Node) -> None:
    # Found by the fuzz campaign: pynetdicom drops such a message after its data set is in
    # a file and before any handler sees it; the file stayed in spool/tmp for good.
    garbled = command((0x0002, b"1.2.840.10008.5.1.4.\x07.1.2\x00"), (0x0100, us(0x0001)),
                      (0x0110, us(1)), (0x0700, us(0)), (0x0800, us(0)),
                      (0x1000, b"1.2.3.4.5\x00"))
    sock = raw_association(node)
    sock.sendall(p_data(1, 3, garbled) + p_data(1, 2, b"\x08\x00\x18\x00UI\x02\x001\x00"))
    read_until_closed(sock, 3)
    sock.close()
    assert wait_for(lambda: idle(node))
    assert wait_for(lambda: not list(node.spool.tmp_dir.iterdir()))


def test_an_event_the_state_machine_does_not_expect_aborts_the_association(
        node: Node, thread_errors: list[str]) -> None:
    sock = raw_association(node)
    server = node.scp._server
    assert server is not None
    assert wait_for(lambda: len(server.active_associations) == 1)
    [assoc] = server.active_associations
    assoc.dul.event_queue.put("Evt18")     # ARTIM expired while established: not in PS3.8's table
    answer, _ = read_until_closed(sock, 10)
    assert answer[:1] == b"\x07"
    assert wait_for(lambda: idle(node))
    assert not thread_errors


def test_stopping_aborts_an_association_whose_accept_handlers_are_still_running(
        limited: Callable[..., Node], monkeypatch: pytest.MonkeyPatch,
        thread_errors: list[str]) -> None:
    # pynetdicom sends the A-ASSOCIATE-AC, runs the accept handlers, and only then says
    # the association is established; a peer may be sending its first store meanwhile.
    accepting = threading.Event()
    original = StorageSCP._on_accepted

    def slow_accept(self: StorageSCP, event: Any) -> None:
        accepting.set()
        time.sleep(3)
        original(self, event)

    monkeypatch.setattr(StorageSCP, "_on_accepted", slow_accept)
    node = limited(association_timeout_s=8)
    sending = raw_association(node)
    sending.sendall(p_data(1, 3, STORE_RQ) + p_data(1, 0, b"\0" * 1000))
    assert accepting.wait(5)
    node.stop()
    answer, closed_after = read_until_closed(sending, 6)
    assert answer[:1] == b"\x07" and closed_after < 6   # told: aborted, not left waiting
    assert not list(node.spool.tmp_dir.iterdir())
    assert not thread_errors


def test_stopping_does_not_wait_for_connections_that_never_associated(
        limited: Callable[..., Node], caplog: pytest.LogCaptureFixture,
        thread_errors: list[str]) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode")
    node = limited(association_timeout_s=8)
    waiting = socket.create_connection(("127.0.0.1", node.scp.port), timeout=5)
    socket.create_connection(("127.0.0.1", node.scp.port), timeout=5).close()
    sending = raw_association(node)
    sending.sendall(p_data(1, 3, STORE_RQ) + p_data(1, 0, b"\0" * 1000))   # a store under way
    assert wait_for(lambda: counts(node)["associations"] == 1
                    and counts(node)["pending"] == {"127.0.0.1": 1})
    started = time.monotonic()
    node.stop()
    assert time.monotonic() - started < 6, "stop waited out the association timeout"
    # The store under way is not acknowledged: an A-ABORT, or (when pynetdicom's DUL
    # thread finds the connection closed under it before it sends one) just the close.
    answer, closed_after = read_until_closed(sending, 6)
    assert answer[:1] in (b"\x07", b"") and closed_after < 6, answer[:12]
    assert read_until_closed(waiting, 6)[1] < 6
    assert not list(node.spool.tmp_dir.iterdir())
    assert not thread_errors
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("dicomnode.net")]
    assert lines.count("association.aborted") == 1, lines
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], lines


def test_aborting_a_connection_that_has_not_associated_closes_it_quietly(
        node: Node, caplog: pytest.LogCaptureFixture, thread_errors: list[str]) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode")
    waiting = socket.create_connection(("127.0.0.1", node.scp.port), timeout=5)
    server = node.scp._server
    assert server is not None
    assert wait_for(lambda: len(server.active_associations) == 1)
    [assoc] = server.active_associations
    assoc.abort(block=False)          # PS3.8 has no A-ABORT before the association exists
    assert read_until_closed(waiting, 3)[1] < 3
    assert wait_for(lambda: idle(node))
    assert not thread_errors
    assert not [r for r in caplog.records
                if r.name.startswith("dicomnode") and r.levelno >= logging.WARNING]


def test_pynetdicom_reads_a_pdu_as_two_reads_the_reader_replaces() -> None:
    """The reader relies on pynetdicom reading a PDU as recv(6), then recv(length)."""
    from pynetdicom.dul import DULServiceProvider

    calls: list[int] = []
    pdu = RELEASE_RQ

    class FakeSocket:
        def recv(self, nr_bytes: int) -> bytes:
            calls.append(nr_bytes)
            data = pdu[sum(calls[:-1]):sum(calls)]
            return data

    class FakeAssoc:
        is_acceptor, mode = True, "acceptor"

        def get_handlers(self, event: object) -> list[object]:
            return []

    dul = DULServiceProvider.__new__(DULServiceProvider)
    dul._assoc = FakeAssoc()  # type: ignore[assignment]
    dul.socket = FakeSocket()  # type: ignore[assignment]
    import queue

    dul.event_queue = queue.Queue()
    dul._recv_pdu = queue.Queue()
    dul._read_pdu_data()
    assert calls == [6, 4]
    assert dul.event_queue.get_nowait() == "Evt12"
