"""C-ECHO and C-STORE SCP against real peers (dcmtk, pynetdicom), bad input included."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import func, select

from dicomnode.config import Settings
from dicomnode.node import Node
from dicomnode.store.models import AuditEvent, Instance, Series, Study
from tests.factories import ct_slice, write_series


def _assoc(node: Node, calling: str = "TESTSCU", sop: str = CTImageStorage,
           ts: list[str] | None = None):
    ae = AE(ae_title=calling)
    if ts:
        ae.add_requested_context(sop, ts)
    else:
        ae.add_requested_context(sop)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title=node.settings.ae_title)
    return assoc


def _storescu(node: Node, paths: list[Path], calling: str = "STORESCU"
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["storescu", "-aet", calling, "-aec", "DICOMNODE", "127.0.0.1",
                           str(node.scp.port), *map(str, paths)],
                          capture_output=True, text=True, timeout=60)


def _count(node: Node) -> int:
    with node.db.session() as s:
        return s.execute(select(func.count(Instance.id))).scalar_one()


def _files(node: Node) -> list[Path]:
    return [p for p in node.spool.root.rglob("*") if p.is_file()]


def test_echo_with_dcmtk_and_pynetdicom(node: Node) -> None:
    out = subprocess.run(["echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(node.scp.port)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assoc = _assoc(node)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_storescu_stores_series_and_files_are_intact(node: Node, tmp_path: Path) -> None:
    paths = write_series(tmp_path / "in", 12)
    out = _storescu(node, paths, "CTSCANNER")
    assert out.returncode == 0, out.stderr
    assert _count(node) == 12
    with node.db.session() as s:
        study = s.execute(select(Study)).scalar_one()
        assert study.calling_aet == "CTSCANNER"
        rows = s.execute(select(Instance)).scalars().all()
    for row in rows:
        stored = pydicom.dcmread(node.spool.root / row.path)
        assert stored.SOPInstanceUID == row.sop_uid
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData for p in paths}
    for row in rows:
        assert pydicom.dcmread(node.spool.root / row.path).PixelData == sent[row.sop_uid]


def test_duplicate_sop_instance_is_stored_once(node: Node) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    assoc = _assoc(node)
    assert assoc.send_c_store(ds).Status == 0
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    assert _count(node) == 1
    assert len(list(node.spool.instances_dir.rglob("*.dcm"))) == 1


def test_allow_list_rejects_unknown_ae_with_reason(settings: Settings) -> None:
    settings.allowed_calling_aets = ["PACS"]
    node = Node(settings)
    node.start()
    try:
        out = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", "DICOMNODE", "127.0.0.1",
                              str(node.scp.port)], capture_output=True, text=True, timeout=30)
        assert out.returncode != 0
        assert "Calling AE Title Not Recognized" in out.stdout + out.stderr
        assoc = _assoc(node, calling="PACS")
        assert assoc.is_established
        assoc.release()
        with node.db.session() as s:
            events = s.execute(select(AuditEvent.calling_aet).where(
                AuditEvent.event == "association.rejected")).scalars().all()
        assert events == ["INTRUDER"]
    finally:
        node.stop()


def _send_raw(node: Node, path: Path, sop_class: str = CTImageStorage) -> int:
    """Send a file's bytes as they are (pynetdicom reads the file meta, sends the rest)."""
    assoc = _assoc(node, sop=sop_class, ts=[pydicom.uid.ExplicitVRLittleEndian])
    assert assoc.is_established
    status = assoc.send_c_store(path)
    assoc.release()
    return int(status.Status)


def _raw_file(tmp_path: Path, body: bytes, sop_uid: str) -> Path:
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    path = tmp_path / "raw.dcm"
    with path.open("wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        pydicom.filewriter.write_file_meta_info(fh, meta, enforce_standard=True)
        fh.write(body)
    return path


@pytest.fixture
def chunked_send():
    from pynetdicom import _config

    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = old


def test_non_dicom_bytes_are_refused(node: Node, tmp_path: Path, chunked_send: None) -> None:
    path = _raw_file(tmp_path, b"this is not a DICOM data set at all" * 50, generate_uid())
    assert _send_raw(node, path) in (0xC210, 0xC220)
    assert _count(node) == 0
    assert not list(node.spool.instances_dir.rglob("*.dcm"))
    assert not list(node.spool.tmp_dir.iterdir())


@pytest.mark.parametrize("body", [b"", b"\0" * 1000, b"\x08\x00\x18\x00UI"],
                         ids=["empty", "all_zero", "cut_header"])
def test_empty_all_zero_or_cut_data_sets_are_refused_as_undecodable(
        node: Node, tmp_path: Path, chunked_send: None, body: bytes) -> None:
    assert _send_raw(node, _raw_file(tmp_path, body, generate_uid())) == 0xC210
    assert _count(node) == 0


def test_an_image_of_zero_rows_is_refused_as_undecodable(node: Node) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    ds.Rows, ds.Columns, ds.PixelData = 0, 0, b""
    status = _send(node, [ds])[0]
    assert status.Status == 0xC210
    assert "Rows" in status.ErrorComment
    assert _count(node) == 0


def test_truncated_dataset_is_refused(node: Node, tmp_path: Path, chunked_send: None) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0, rows=64, cols=64)
    full = tmp_path / "full.dcm"
    ds.save_as(full, enforce_file_format=True)
    data = full.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 1000])
    assert _send_raw(node, cut) == 0xC210
    assert _count(node) == 0


def test_missing_study_uid_is_refused(node: Node) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    del ds.StudyInstanceUID
    assoc = _assoc(node)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC220
    assert "StudyInstanceUID" in status.ErrorComment
    assert _count(node) == 0


def test_disallowed_sop_class_is_refused(node: Node) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    assoc = _assoc(node, sop=MRImageStorage)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0122
    assert _count(node) == 0


def test_disk_reserve_refuses_with_out_of_resources(settings: Settings) -> None:
    settings.disk_reserve_mb = 2**40  # a petabyte: never available
    node = Node(settings)
    node.start()
    try:
        assoc = _assoc(node)
        status = assoc.send_c_store(ct_slice(generate_uid(), generate_uid(), 0.0, 0))
        assoc.release()
        assert status.Status == 0xA700
        assert _count(node) == 0
        assert not list(node.spool.instances_dir.rglob("*.dcm"))
    finally:
        node.stop()


def test_no_patient_values_in_logs(node: Node, caplog: pytest.LogCaptureFixture,
                                   tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    del ds.SeriesInstanceUID  # a refusal is logged too
    assoc = _assoc(node)
    assoc.send_c_store(ds)
    assoc.send_c_store(ct_slice(generate_uid(), generate_uid(), 0.0, 0))
    assoc.release()
    from dicomnode.logs import JsonFormatter, TextFormatter

    text = "\n".join(TextFormatter().format(r) + JsonFormatter().format(r)
                     for r in caplog.records)
    assert "instance.refused" in text and "association.released" in text
    for secret in ("Secret", "SECRET-ID-42", "19700101"):
        assert secret not in text


def test_store_begins_when_the_last_fragment_arrives(node: Node, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Check, flush and index start on pynetdicom's DUL thread as the dataset completes;
    # the C-STORE handler answers with that store's outcome instead of storing again.
    begun: list[str] = []
    direct: list[str] = []
    begin, store_file = node.store.begin_store, node.store.store_file

    def spy_begin(path: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        begun.append(path.name)
        return begin(path, *args, **kwargs)

    def spy_store_file(path: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        direct.append(path.name)
        return store_file(path, *args, **kwargs)

    monkeypatch.setattr(node.store, "begin_store", spy_begin)
    paths = write_series(tmp_path / "in", 5)
    out = _storescu(node, paths, "EARLY")
    assert out.returncode == 0, out.stderr
    assert _count(node) == 5
    assert len(begun) == 5
    assert not node.scp._early                # nothing left behind
    assert not list(node.spool.tmp_dir.iterdir())
    with node.db.session() as s:
        assert s.execute(select(Study)).scalar_one().calling_aet == "EARLY"
    # without the early start (e.g. an older pynetdicom) the handler stores itself
    monkeypatch.setattr(node.scp, "_on_dimse_recv", lambda event: None)
    node.scp.stop()
    node.scp.start()
    monkeypatch.setattr(node.store, "store_file", spy_store_file)
    more = write_series(tmp_path / "more", 3)
    out = _storescu(node, more)
    assert out.returncode == 0, out.stderr
    assert _count(node) == 8 and len(direct) == 3


# --- UID clashes: refused with a status the sender logs, audited, nothing written -------

def _send(node: Node, datasets: list[pydicom.Dataset], calling: str = "CTSCANNER"
          ) -> list[pydicom.Dataset]:
    assoc = _assoc(node, calling=calling)
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds) for ds in datasets]
    assoc.release()
    return statuses


def _series_sops(node: Node, series_uid: str) -> tuple[str, list[str]]:
    with node.db.session() as s:
        rows = s.execute(select(Study.study_uid, Instance.sop_uid)
                         .join(Series, Instance.series_pk == Series.id)
                         .join(Study, Series.study_pk == Study.id)
                         .where(Series.series_uid == series_uid)).all()
    assert len({study for study, _ in rows}) == 1
    return rows[0][0], sorted(sop for _, sop in rows)


def _audit(node: Node, event: str) -> list[AuditEvent]:
    with node.db.session() as s:
        rows = list(s.execute(select(AuditEvent).where(AuditEvent.event == event)).scalars())
        s.expunge_all()
    return rows


def test_the_clash_statuses_are_failures_in_pynetdicom_s_storage_table() -> None:
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    for code in (0xC230, 0xC231, 0x0111):
        assert STORAGE_SERVICE_CLASS_STATUS[code][0] == "Failure"


def test_a_series_uid_of_another_study_is_refused_over_the_network_and_audited(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    study_a, study_b, series = generate_uid(), generate_uid(), generate_uid()
    first = [ct_slice(study_a, series, 2.0 * i, i) for i in range(3)]
    assert [s.Status for s in _send(node, first)] == [0, 0, 0]
    # another patient's study whose scanner reused the series UID, with a series of its own
    own = ct_slice(study_b, generate_uid(), 0.0, 0)
    other = ct_slice(study_b, series, 9.0, 7)
    for ds in (own, other):
        ds.PatientName, ds.PatientID = "Other^Person", "OTHER-ID"
    statuses = _send(node, [own, other], calling="OTHERCT")
    assert statuses[0].Status == 0
    assert statuses[1].Status == 0xC230
    assert statuses[1].ErrorComment == (
        "Series Instance UID already belongs to another study; refused")
    assert _series_sops(node, series) == (study_a, sorted(ds.SOPInstanceUID for ds in first))
    with node.db.session() as s:
        counts = dict(s.execute(select(Study.study_uid, Study.instance_count)).all())
    assert counts == {study_a: 3, study_b: 1}
    [row] = _audit(node, "instance.refused_uid_clash")
    assert (row.study_uid, row.calling_aet) == (study_b, "OTHERCT")
    assert row.detail == {"clash": "series_in_other_study", "sop_uid": other.SOPInstanceUID,
                          "series_uid": series, "other_study_uid": study_a}
    assert not list(node.spool.tmp_dir.iterdir())
    assert not list(node.spool.instances_dir.rglob(f"{other.SOPInstanceUID}.dcm"))
    text = caplog.text + repr([getattr(r, "dn_fields", "") for r in caplog.records])
    assert "instance.refused_uid_clash" in text
    for secret in ("Secret", "SECRET-ID-42", "19700101", "Other^Person", "OTHER-ID"):
        assert secret not in text


def test_a_study_uid_of_another_patient_is_refused_over_the_network_and_audited(
        node: Node) -> None:
    study, series = generate_uid(), generate_uid()
    first = [ct_slice(study, series, 2.0 * i, i) for i in range(2)]
    other = ct_slice(study, series, 9.0, 7)
    other.PatientID = "OTHER-ID"
    statuses = _send(node, [*first, other])
    assert [s.Status for s in statuses] == [0, 0, 0xC231]
    assert statuses[2].ErrorComment == (
        "Study Instance UID already belongs to another patient; refused")
    assert _series_sops(node, series) == (study, sorted(ds.SOPInstanceUID for ds in first))
    [row] = _audit(node, "instance.refused_uid_clash")
    assert row.detail is not None and row.detail["clash"] == "study_of_other_patient"
    assert "OTHER-ID" not in repr(row.detail) and "SECRET" not in repr(row.detail)
    assert not list(node.spool.tmp_dir.iterdir())


def test_a_sop_uid_stored_with_other_content_is_refused_over_the_network_and_audited(
        node: Node) -> None:
    study_a, series_a = generate_uid(), generate_uid()
    first = ct_slice(study_a, series_a, 0.0, 0)
    elsewhere = ct_slice(generate_uid(), generate_uid(), 0.0, 0)  # another study
    changed = ct_slice(study_a, series_a, 0.0, 5)                 # other pixels
    for ds in (elsewhere, changed):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    statuses = _send(node, [first, elsewhere, changed, first], calling="PACS")
    assert [s.Status for s in statuses] == [0, 0x0111, 0x0111, 0]  # the last: a true duplicate
    assert statuses[1].ErrorComment == "SOP Instance UID already stored in another study; refused"
    assert statuses[2].ErrorComment == "SOP Instance UID already stored with other content; refused"
    assert _series_sops(node, series_a) == (study_a, [first.SOPInstanceUID])
    stored = pydicom.dcmread(next(node.spool.instances_dir.rglob("*.dcm")))
    assert stored.PixelData == first.PixelData
    rows = _audit(node, "instance.refused_uid_conflict")
    assert [(r.study_uid, r.calling_aet, (r.detail or {})["conflict"]) for r in rows] == [
        (elsewhere.StudyInstanceUID, "PACS", "study"), (study_a, "PACS", "content")]
    with node.db.session() as s:
        assert s.execute(select(func.count(Study.id))).scalar_one() == 1
    assert not list(node.spool.tmp_dir.iterdir())
    assert len(list(node.spool.instances_dir.rglob("*.dcm"))) == 1


# --- association set-up: who may call, under which title ----------------------------

def test_a_wrong_called_ae_title_is_rejected_at_association_time_and_audited(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode")
    out = subprocess.run(["echoscu", "-aet", "SCANNER", "-aec", "NOTTHENODE", "127.0.0.1",
                          str(node.scp.port)], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "Called AE Title Not Recognized" in out.stdout + out.stderr
    assoc = _assoc(node, calling="SCANNER")      # the node's own title is accepted
    assert assoc.is_established
    assoc.release()
    [row] = _audit(node, "association.rejected")
    assert row.calling_aet == "SCANNER"
    assert row.detail is not None
    assert row.detail["reason"] == "called AE title not recognised"
    assert row.detail["called_aet"] == "NOTTHENODE"
    [record] = [r for r in caplog.records if r.getMessage() == "association.rejected"]
    assert getattr(record, "dn_fields", {})["reason"] == "called AE title not recognised"


def test_any_called_ae_title_is_accepted_when_not_required(settings: Settings) -> None:
    node = Node(settings.model_copy(update={"require_called_aet": False}))
    node.start()
    try:
        out = subprocess.run(["echoscu", "-aec", "ANY-SCP", "127.0.0.1", str(node.scp.port)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        node.stop()


# --- a full disk: 0xA700, the association goes on, nothing partial left --------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (needs root; skipped where mounting is not permitted)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _node_on(settings: Settings, data_dir: Path, tmp_path: Path, **changes: object) -> Node:
    """A node whose spool is on ``data_dir`` (its database stays elsewhere)."""
    node = Node(settings.model_copy(update={
        "data_dir": data_dir, "database_url": f"sqlite:///{tmp_path / 'index.db'}",
        **changes}))
    node.start()
    return node


def test_a_full_disk_answers_out_of_resources_and_the_association_goes_on(
        settings: Settings, small_disk: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode")
    escaped: list[str] = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: escaped.append(args.exc_type.__name__))
    node = _node_on(settings, small_disk, tmp_path, disk_reserve_mb=0)
    try:
        too_big = ct_slice(generate_uid(), generate_uid(), 0.0, 0, rows=2048, cols=2048)  # 8 MiB
        small = ct_slice(generate_uid(), generate_uid(), 0.0, 1)
        assoc = _assoc(node)
        assert assoc.is_established
        refused = assoc.send_c_store(too_big)
        assert refused.get("Status") == 0xA700, refused
        assert "space" in refused.ErrorComment
        assert not list(node.spool.tmp_dir.iterdir()), "the partial file was left"
        assert assoc.is_established
        assert assoc.send_c_store(small).Status == 0    # room again: the partial file is gone
        assoc.release()
        assert _count(node) == 1
    finally:
        node.stop()
    assert not escaped
    assert not [r for r in caplog.records if r.exc_info]
    assert not list(node.spool.tmp_dir.iterdir())


def test_the_disk_reserve_is_checked_before_a_received_dataset_is_written(
        settings: Settings, small_disk: Path, tmp_path: Path) -> None:
    (small_disk / "ballast").write_bytes(b"\0" * 3 * 2**20)     # ~5 MiB free
    node = _node_on(settings, small_disk, tmp_path, disk_reserve_mb=6)
    written: list[int] = []
    sending = threading.Event()

    def watch() -> None:  # how much of the data set ever reaches spool/tmp
        while sending.is_set():
            written.append(sum(p.stat().st_size for p in node.spool.tmp_dir.iterdir()
                               if p.exists()))
            time.sleep(0.001)

    try:
        assoc = _assoc(node)
        sending.set()
        watcher = threading.Thread(target=watch)
        watcher.start()
        status = assoc.send_c_store(ct_slice(generate_uid(), generate_uid(), 0.0, 0,
                                             rows=1024, cols=1024))   # 2 MiB: it would fit
        sending.clear()
        watcher.join()
        assert status.Status == 0xA700
        assert "reserve" in status.ErrorComment
        assert max(written, default=0) == 0, f"{max(written)} bytes written below the reserve"
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        sending.clear()
        node.stop()


def test_received_data_sets_go_through_the_node_s_file_only_while_it_listens(
        settings: Settings) -> None:
    from pynetdicom import dimse_messages

    from dicomnode.net.scp import ReceiveFile

    original = dimse_messages.NamedTemporaryFile
    node = Node(settings)
    node.start()
    try:
        made = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
        assert isinstance(made, ReceiveFile)
        assert Path(made.name).parent == node.spool.tmp_dir
        made.discard()
        assert not Path(made.name).exists()
    finally:
        node.stop()
    assert dimse_messages.NamedTemporaryFile is original


# --- stores cut short leave nothing behind, while the node runs -----------------------

def _tmp_bytes(node: Node) -> int:
    return sum(p.stat().st_size for p in node.spool.tmp_dir.iterdir() if p.exists())


def _eventually(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.mark.parametrize("ending", ["a_abort", "connection_closed", "node_stopped"])
def test_the_partial_file_of_a_store_cut_short_is_removed_at_once(node: Node,
                                                                  ending: str) -> None:
    from tests.net.rawpeer import A_ABORT_RQ, STORE_RQ, p_data, raw_association

    sock = raw_association(node)
    sock.sendall(p_data(1, 3, STORE_RQ))
    for _ in range(4):
        sock.sendall(p_data(1, 0, b"\0" * 60_000))   # data set fragments, not the last
    assert _eventually(lambda: _tmp_bytes(node) >= 240_000), "the data set never arrived"
    if ending == "a_abort":
        sock.sendall(A_ABORT_RQ)
    elif ending == "connection_closed":
        sock.close()
    else:
        node.stop()
    assert _eventually(lambda: not list(node.spool.tmp_dir.iterdir()), 2), (
        f"left in spool/tmp: {list(node.spool.tmp_dir.iterdir())}")
    sock.close()


def test_stores_refused_after_their_association_ended_leave_nothing(node: Node) -> None:
    from tests.net.rawpeer import A_ABORT_RQ, STORE_RQ, p_data, raw_association

    for _ in range(10):   # the abort lands before or after the store begins: both ways
        sock = raw_association(node)
        sock.sendall(p_data(1, 3, STORE_RQ) + p_data(1, 2, b"\x08\x00\x60\x00CS\x02\x00CT")
                     + A_ABORT_RQ)                     # a whole data set without UIDs
        sock.close()
    assert _eventually(lambda: not list(node.spool.tmp_dir.iterdir()), 3), (
        f"left in spool/tmp: {list(node.spool.tmp_dir.iterdir())}")
    assert _count(node) == 0
