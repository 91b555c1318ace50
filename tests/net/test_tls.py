"""DICOM TLS (PS3.15 Annex B): the listener's TLS port with dcmtk and pynetdicom as
senders, mutual authentication accepted and refused, the handshake's deadline, and
results sent over TLS to dcmtk's storescp."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import func, select

from dicomnode.config import PeerTls, Settings
from dicomnode.logs import LogLimit
from dicomnode.net import tls as tls_module
from dicomnode.net.scu import SendError, send_files
from dicomnode.node import Node
from dicomnode.store.models import AuditEvent, Delivery, Instance
from dicomnode.workflow.export import Outbox, Target
from tests.conftest import free_port
from tests.factories import ct_slice, write_series
from tests.net.certs import SERVER_EXT, KeyPair, Pki, issue, make_pki
from tests.net.rawpeer import associate_rq, read_until_closed
from tests.peers import wait_port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_node(settings: Settings, pki: Pki) -> Iterator[Callable[..., Node]]:
    """Start a node with a TLS port (mutual authentication required unless changed)."""
    started: list[Node] = []

    def start(*, require: bool = True, ca: Path | None = None,
              certificate: KeyPair | None = None, **changes: Any) -> Node:
        own = certificate or pki.server
        tls = {"port": free_port(), "certificate": own.certificate,
               "private_key": own.private_key, "ca_certificates": ca or pki.ca,
               "require_client_certificate": require}
        node = Node(Settings.model_validate({**settings.model_dump(), "tls": tls, **changes}))
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def dcmtk(tool: str, node: Node, *tls: str, files: list[Path] | None = None,
          port: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``echoscu`` or ``storescu`` against the node's TLS port."""
    return subprocess.run(
        [tool, *tls, "-aet", "DCMTKSCU", "-aec", node.settings.ae_title, "127.0.0.1",
         str(port or node.scp.tls_port), *map(str, files or [])],
        capture_output=True, text=True, timeout=60)


def with_key(pair: KeyPair, ca: Path) -> list[str]:
    """dcmtk's options for a client presenting ``pair`` and trusting ``ca``."""
    return ["+tls", str(pair.private_key), str(pair.certificate), "-pw", "+cf", str(ca)]


def tls_counts(node: Node) -> dict[str, Any]:
    server = node.scp._tls_server
    assert server is not None
    return dict(server.counts)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def idle(node: Node) -> bool:
    return tls_counts(node) == {"associations": 0, "associated": {}, "pending": {}}


def refusals(node: Node) -> list[str]:
    with node.db.session() as s:
        rows = s.execute(select(AuditEvent).where(
            AuditEvent.event == "tls.handshake_failed")).scalars().all()
    return [str((r.detail or {})["reason"]) for r in rows]


def node_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("dicomnode")
            and r.levelno >= logging.WARNING]


def client_context(pki: Pki, pair: KeyPair | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if pair is not None:
        context.load_cert_chain(pair.certificate, pair.private_key)
    return context


def instances(node: Node) -> int:
    with node.db.session() as s:
        return int(s.execute(select(func.count(Instance.id))).scalar_one())


# --- senders over TLS: dcmtk and pynetdicom --------------------------------------------

def test_dcmtk_with_a_certificate_from_the_trusted_ca_echoes_and_stores_over_tls(
        tls_node: Callable[..., Node], pki: Pki, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode")
    node = tls_node()
    echo = dcmtk("echoscu", node, *with_key(pki.client, pki.ca))
    assert echo.returncode == 0, echo.stderr
    paths = write_series(tmp_path / "in", 3)
    store = dcmtk("storescu", node, *with_key(pki.client, pki.ca), files=paths)
    assert store.returncode == 0, store.stderr
    assert instances(node) == 3
    assert not node_lines(caplog)
    assert wait_for(lambda: idle(node))


def test_pynetdicom_stores_over_tls_and_the_plain_port_still_serves(
        tls_node: Callable[..., Node], pki: Pki) -> None:
    node = tls_node()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.scp.tls_port, ae_title="DICOMNODE",
                         tls_args=(client_context(pki, pki.client), "127.0.0.1"))
    assert assoc.is_established
    assert assoc.send_c_store(ct_slice(generate_uid(), generate_uid(), 0.0, 0)).Status == 0
    assoc.release()
    plain = ae.associate("127.0.0.1", node.scp.port, ae_title="DICOMNODE")
    assert plain.is_established
    assert plain.send_c_store(ct_slice(generate_uid(), generate_uid(), 0.0, 0)).Status == 0
    plain.release()
    assert instances(node) == 2


def test_a_sender_without_a_certificate_is_accepted_when_none_is_required(
        tls_node: Callable[..., Node], pki: Pki) -> None:
    node = tls_node(require=False)
    echo = dcmtk("echoscu", node, "+tla", "+cf", str(pki.ca))
    assert echo.returncode == 0, echo.stderr


def test_a_node_with_only_a_tls_port_listens_on_nothing_else(
        tls_node: Callable[..., Node], pki: Pki) -> None:
    node = tls_node(port=None)
    assert node.scp.port is None and node.scp._server is None
    echo = dcmtk("echoscu", node, *with_key(pki.client, pki.ca))
    assert echo.returncode == 0, echo.stderr


# --- refused handshakes: one log line, audited, the slot given back --------------------

_REFUSED: dict[str, tuple[Callable[[Pki], list[str]], str]] = {
    "no_client_certificate": (lambda p: ["+tla", "+cf", str(p.ca)],
                              "peer did not return a certificate"),
    "certificate_from_another_ca": (lambda p: with_key(p.stranger, p.ca),
                                    "certificate verify failed: unable to get local issuer"),
    "expired_certificate": (lambda p: with_key(p.expired_client, p.ca),
                            "certificate verify failed: certificate has expired"),
    "plain_dicom": (lambda p: [], "plain DICOM on the TLS port"),
}


@pytest.mark.parametrize("case", sorted(_REFUSED))
def test_a_refused_tls_sender_gets_no_association_and_one_log_line(
        tls_node: Callable[..., Node], pki: Pki, case: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    node = tls_node()
    options, reason = _REFUSED[case]
    echo = dcmtk("echoscu", node, *options(pki))
    assert echo.returncode != 0
    assert wait_for(lambda: len(refusals(node)) == 1)   # written after the connection closed
    lines = node_lines(caplog)
    assert [r.getMessage() for r in lines] == ["tls.handshake_failed"]
    assert not any(r.exc_info for r in caplog.records if r.name.startswith("dicomnode"))
    [logged] = refusals(node)
    assert logged.startswith(reason), logged
    assert wait_for(lambda: idle(node))
    again = dcmtk("echoscu", node, *with_key(pki.client, pki.ca))   # still serving
    assert again.returncode == 0, again.stderr


def test_the_node_refuses_a_peer_that_does_not_trust_its_certificate(
        tls_node: Callable[..., Node], pki: Pki) -> None:
    node = tls_node()
    echo = dcmtk("echoscu", node, *with_key(pki.client, pki.other_ca))
    assert echo.returncode != 0
    assert wait_for(lambda: len(refusals(node)) == 1)
    assert refusals(node) == ["tlsv1 alert unknown ca"]


def test_tls_older_than_1_2_is_refused(tls_node: Callable[..., Node], pki: Pki) -> None:
    node = tls_node(require=False)
    old = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{node.scp.tls_port}", "-tls1_1",
         "-cipher", "DEFAULT@SECLEVEL=0", "-CAfile", str(pki.ca)],
        input="", capture_output=True, text=True, timeout=30)
    assert old.returncode != 0
    assert wait_for(lambda: len(refusals(node)) == 1)
    assert refusals(node)[0] in ("unsupported protocol", "no protocols available",
                                 "wrong ssl version"), refusals(node)
    new = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{node.scp.tls_port}", "-tls1_2",
         "-CAfile", str(pki.ca), "-verify_return_error"],
        input="", capture_output=True, text=True, timeout=30)
    assert new.returncode == 0, new.stdout[-500:]
    assert "TLSv1.2" in new.stdout


# --- the handshake's deadline ----------------------------------------------------------

def test_a_connection_that_never_starts_the_handshake_is_closed_at_the_deadline(
        tls_node: Callable[..., Node], pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dicomnode")
    node = tls_node(association_timeout_s=1.5)
    silent = socket.create_connection(("127.0.0.1", node.scp.tls_port), timeout=5)
    assert wait_for(lambda: tls_counts(node)["pending"] == {"127.0.0.1": 1})
    # the accept loop is not held: another sender completes its handshake meanwhile
    started = time.monotonic()
    echo = dcmtk("echoscu", node, *with_key(pki.client, pki.ca))
    assert echo.returncode == 0, echo.stderr
    assert time.monotonic() - started < 1.5
    _, closed_after = read_until_closed(silent, 5)
    assert closed_after < 3
    assert wait_for(lambda: idle(node) and len(refusals(node)) == 1)
    assert refusals(node) == ["no TLS handshake within association_timeout_s"]
    assert [r.getMessage() for r in node_lines(caplog)] == ["tls.handshake_failed"]


def test_a_trickled_client_hello_is_cut_at_the_deadline(
        tls_node: Callable[..., Node]) -> None:
    node = tls_node(association_timeout_s=1, max_associations_per_ip=1)
    sock = socket.create_connection(("127.0.0.1", node.scp.tls_port), timeout=5)
    started = time.monotonic()
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 500
    try:
        for byte in hello:                    # 25 s in all, one byte every 50 ms
            sock.sendall(bytes([byte]))
            time.sleep(0.05)
            if time.monotonic() - started > 4:
                break
    except OSError:
        pass                                  # closed by the node: what should happen
    assert time.monotonic() - started < 3, "the trickle was read for as long as it lasted"
    assert wait_for(lambda: idle(node) and len(refusals(node)) == 1)
    assert refusals(node) == ["no TLS handshake within association_timeout_s"]


@pytest.mark.parametrize(("junk", "reason"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a TLS handshake"),
    (b"\x16\x03\x01\x00\x05" + b"\xff" * 5, ""),          # a record that is no ClientHello
    (associate_rq(), "plain DICOM on the TLS port"),
])
def test_junk_instead_of_a_client_hello_is_refused_at_once(
        tls_node: Callable[..., Node], junk: bytes, reason: str) -> None:
    node = tls_node(association_timeout_s=5)
    sock = socket.create_connection(("127.0.0.1", node.scp.tls_port), timeout=5)
    sock.sendall(junk)
    answer, closed_after = read_until_closed(sock, 5)
    assert closed_after < 1
    assert answer[:1] != b"\x02"
    assert wait_for(lambda: idle(node) and len(refusals(node)) == 1)
    [logged] = refusals(node)
    assert logged.startswith(reason) and logged != "no TLS handshake within " \
        "association_timeout_s", logged


def test_a_connection_closed_before_sending_anything_is_not_a_refusal(
        tls_node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dicomnode")
    node = tls_node()
    socket.create_connection(("127.0.0.1", node.scp.tls_port), timeout=5).close()
    assert wait_for(lambda: idle(node))
    assert not node_lines(caplog) and not refusals(node)


def test_stopping_ends_handshakes_under_way_at_once(
        tls_node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dicomnode")
    node = tls_node(association_timeout_s=30)
    silent = socket.create_connection(("127.0.0.1", node.scp.tls_port), timeout=5)
    assert wait_for(lambda: tls_counts(node)["pending"] == {"127.0.0.1": 1})
    node.stop()
    assert read_until_closed(silent, 5)[1] < 3
    assert not node_lines(caplog)


def test_both_ports_share_the_association_limit(
        tls_node: Callable[..., Node], pki: Pki) -> None:
    node = tls_node(max_associations=1)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    plain = ae.associate("127.0.0.1", node.scp.port, ae_title="DICOMNODE")
    assert plain.is_established
    try:
        over_tls = ae.associate("127.0.0.1", node.scp.tls_port, ae_title="DICOMNODE",
                                tls_args=(client_context(pki, pki.client), "127.0.0.1"))
        assert over_tls.is_rejected
        assert over_tls.acceptor.primitive.diagnostic == 0x02   # local limit exceeded
    finally:
        plain.release()


# --- results sent over TLS -------------------------------------------------------------

@pytest.fixture
def storescp_tls(tmp_path: Path, pki: Pki, request: pytest.FixtureRequest,
                 ) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp on a TLS port, requiring a client certificate from the test CA
    (its own certificate: ``pki.server``, or the one an indirect parameter names)."""
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    own: KeyPair = getattr(pki, getattr(request, "param", "server"))
    proc = subprocess.Popen(
        ["storescp", "--aetitle", "TLSSCP", "--output-directory", str(out), "+tls",
         str(own.private_key), str(own.certificate), "-pw", "+cf", str(pki.ca),
         "-rc", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_results_are_sent_over_tls_with_the_nodes_client_certificate(
        storescp_tls: tuple[int, Path], pki: Pki, tmp_path: Path) -> None:
    port, received = storescp_tls
    paths = write_series(tmp_path / "results", 2)
    tls = PeerTls(ca_certificates=pki.ca, certificate=pki.client.certificate,
                  private_key=pki.client.private_key)
    result = send_files(paths, host="127.0.0.1", port=port, called_aet="TLSSCP", tls=tls)
    assert result.ok and len(result.sent) == 2
    got = sorted(pydicom.dcmread(p).SOPInstanceUID for p in received.iterdir())
    assert got == sorted(pydicom.dcmread(p).SOPInstanceUID for p in paths)


@pytest.mark.parametrize(("storescp_tls", "tls", "reason"), [
    ("server", {"ca_certificates": "other_ca"}, "TLS: certificate verify failed"),
    ("expired_server", {"ca_certificates": "ca"},
     "TLS: certificate verify failed: certificate has expired"),
    ("server", {"ca_certificates": "ca"}, "TLS: .*alert"),   # no client certificate sent
], indirect=["storescp_tls"])
def test_a_tls_delivery_that_cannot_be_made_says_why(
        storescp_tls: tuple[int, Path], pki: Pki, tmp_path: Path, tls: dict[str, str],
        reason: str) -> None:
    port, received = storescp_tls
    paths = write_series(tmp_path / "results", 1)
    with pytest.raises(SendError, match=f"over TLS (failed|aborted): {reason}") as exc:
        send_files(paths, host="127.0.0.1", port=port, called_aet="TLSSCP",
                   tls=PeerTls(ca_certificates=getattr(pki, tls["ca_certificates"])))
    assert "Traceback" not in str(exc.value)
    assert not list(received.iterdir())


def test_the_outbox_sends_to_a_peer_configured_with_tls(
        storescp_tls: tuple[int, Path], pki: Pki, settings: Settings, tmp_path: Path) -> None:
    from dicomnode.store.db import Database

    port, received = storescp_tls
    tls = {"ca_certificates": pki.ca, "certificate": pki.client.certificate,
           "private_key": pki.client.private_key}
    settings = Settings.model_validate({**settings.model_dump(), "peers": {
        "TLSSCP": {"host": "127.0.0.1", "port": port, "tls": tls}}})
    db = Database(settings.db_url)
    db.upgrade()
    outbox = Outbox(db, settings)
    paths = write_series(tmp_path / "results", 2)
    delivery = outbox.enqueue(paths, Target("TLSSCP", "127.0.0.1", port, "sender TLSSCP"))
    assert outbox.process_due() == 1
    with db.session() as s:
        row = s.get(Delivery, delivery)
        assert row is not None
        assert (row.state, row.last_error) == ("done", None)
    assert len(list(received.iterdir())) == 2
    db.dispose()


def test_a_tls_client_on_the_plain_port_is_refused_with_a_hint(
        tls_node: Callable[..., Node], pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dicomnode")
    node = tls_node()
    started = time.monotonic()
    echo = dcmtk("echoscu", node, *with_key(pki.client, pki.ca), port=node.scp.port)
    assert echo.returncode != 0
    assert time.monotonic() - started < 5
    assert wait_for(lambda: idle(node))
    assert [r.getMessage() for r in node_lines(caplog)] == ["association.tls_on_plain_port"]


# --- the operator's view: certificate expiry, a sender failing over and over ------------


def test_a_certificate_about_to_expire_is_warned_about_and_its_expiry_exported(
        tls_node: Callable[..., Node], pki: Pki, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode")
    soon = issue(tmp_path, KeyPair(pki.ca, pki.ca.with_suffix(".key")), "soon", 5, SERVER_EXT)
    node = tls_node(certificate=soon)
    [warning] = [r for r in node_lines(caplog)
                 if r.getMessage() == "tls.certificate_expires_soon"]
    assert 4 < warning.dn_fields["days_left"] <= 5
    expiry = node.metrics.registry.get_sample_value(
        "dicomnode_tls_certificate_expiry_timestamp_seconds")
    assert expiry is not None and 4 * 86400 < expiry - time.time() <= 5 * 86400
    assert dcmtk("echoscu", node, *with_key(pki.client, pki.ca)).returncode == 0


def test_a_certificate_file_is_read_again_only_when_it_changes(
        pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = KeyPair(pki.ca, pki.ca.with_suffix(".key"))
    path = issue(tmp_path, ca, "node", 5, SERVER_EXT).certificate
    first = tls_module.certificate_expiry(path)
    assert first is not None and 4 * 86400 < first - time.time() <= 5 * 86400
    reads: list[str] = []
    decode = ssl._ssl._test_decode_cert  # type: ignore[attr-defined]

    def counting(name: str) -> dict[str, object]:
        reads.append(name)
        return decode(name)  # type: ignore[no-any-return]

    monkeypatch.setattr(ssl._ssl, "_test_decode_cert", counting)  # type: ignore[attr-defined]
    assert tls_module.certificate_expiry(path) == first   # a delivery's context: no read
    assert reads == []
    renewed = issue(tmp_path, ca, "renewed", 400, SERVER_EXT).certificate
    path.write_bytes(renewed.read_bytes())                 # renewed in place
    later = tls_module.certificate_expiry(path)
    assert later is not None and later - first > 390 * 86400 and reads == [str(path)]


def test_an_expired_certificate_is_an_error_in_the_log_at_start(
        tls_node: Callable[..., Node], pki: Pki, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode")
    monkeypatch.setattr(tls_module, "_expiry_log", LogLimit(86400))   # once a day per process
    node = tls_node(certificate=pki.expired_server)
    assert node.scp.tls_port is not None   # the plain port and the rest keep running
    [error] = [r for r in node_lines(caplog) if r.getMessage() == "tls.certificate_expired"]
    assert error.levelno == logging.ERROR and error.dn_fields["days_left"] < 0


def test_a_sender_failing_the_handshake_over_and_over_is_logged_once_and_counted(
        tls_node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dicomnode")
    node = tls_node(association_timeout_s=5)
    for _ in range(12):
        sock = socket.create_connection(("127.0.0.1", node.scp.tls_port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        read_until_closed(sock, 5)
        sock.close()
    assert wait_for(lambda: idle(node) and node.metrics.registry.get_sample_value(
        "dicomnode_tls_handshake_failures_total") == 12)
    assert len(refusals(node)) == 1
    assert [r.getMessage() for r in node_lines(caplog)] == ["tls.handshake_failed"]
