"""InstanceStore: its two index paths (SQLite driver, SQLAlchemy Core) give the same rows,
and neither files one study's, or one patient's, instance under another's."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from datetime import datetime
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, RLELossless, generate_uid
from sqlalchemy import func, select

from dicomnode.store import instances
from dicomnode.store.db import Database
from dicomnode.store.header import InstanceRejectedError
from dicomnode.store.instances import InstanceStore
from dicomnode.store.models import AuditEvent, Instance, Patient, Series, Study
from dicomnode.store.spool import Spool
from tests.factories import ct_slice


def _received(spool: Spool, ds: object, name: str) -> Path:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # type: ignore[attr-defined]
    path = spool.tmp_dir / name
    path.write_bytes(buf.getvalue())
    return path


def _encoded(ds: object) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # type: ignore[attr-defined]
    return buf.getvalue()


def _rows(db: Database) -> list[tuple[object, ...]]:
    with db.session() as s:
        rows = s.execute(select(Instance).order_by(Instance.instance_number)).scalars().all()
        study = s.execute(select(Study)).scalar_one()
        series = s.execute(select(Series)).scalar_one()
        assert isinstance(rows[0].received_at, datetime) and rows[0].received_at.tzinfo
        return [(study.instance_count, series.instance_count)] + [
            (r.instance_number, r.slice_position, r.size, r.calling_aet, r.study_version,
             r.image_type, r.orientation) for r in rows]


@pytest.mark.parametrize("driver", [True, False])
def test_index_paths_agree(tmp_path: Path, driver: bool,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    if not driver:
        monkeypatch.setattr(instances._DriverIndex, "usable", staticmethod(lambda e: False))
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    db.upgrade()
    spool = Spool(tmp_path / "spool", 0)
    store = InstanceStore(db, spool)
    assert (store._driver is not None) == driver
    study, series = generate_uid(), generate_uid()
    slices = [ct_slice(study, series, 2.0 * i, i) for i in range(4)]
    for i, ds in enumerate(slices):
        outcome = store.store_file(_received(spool, ds, f"r{i}.dcm"), "SCANNER")
        assert not outcome.duplicate
    again = store.store_file(_received(spool, slices[2], "again.dcm"), "SCANNER")
    assert again.duplicate
    future = store.begin_store(_received(spool, ct_slice(study, series, 8.0, 4), "x.dcm"),
                               "SCANNER")
    assert not future.result(timeout=30).duplicate
    store.close()
    rows = _rows(db)
    assert rows[0] == (5, 5)
    assert [r[0] for r in rows[1:]] == [1, 2, 3, 4, 5]
    assert [r[1] for r in rows[1:]] == pytest.approx([0.0, 2.0, 4.0, 6.0, 8.0])
    assert all(r[3] == "SCANNER" and r[4] == 1 for r in rows[1:])
    assert rows[1][5] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert not list(spool.tmp_dir.iterdir())
    db.dispose()


# --- UID clashes: never merge two studies' or two patients' data ------------------------

@pytest.fixture(params=[True, False], ids=["driver", "core"])
def store(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[InstanceStore]:
    """An InstanceStore on a SQLite file, through the driver fast path or SQLAlchemy Core."""
    if not request.param:
        monkeypatch.setattr(instances._DriverIndex, "usable", staticmethod(lambda e: False))
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    db.upgrade()
    s = InstanceStore(db, Spool(tmp_path / "spool", 0))
    assert (s._driver is not None) == request.param
    yield s
    s.close()
    db.dispose()


def _series_of(store: InstanceStore, series_uid: str) -> tuple[str, list[str]]:
    """The study a series is filed under and its instances' SOP UIDs."""
    with store.db.session() as s:
        series = s.execute(select(Series).where(Series.series_uid == series_uid)).scalar_one()
        sops = sorted(s.execute(select(Instance.sop_uid).where(
            Instance.series_pk == series.id)).scalars())
        return series.study.study_uid, sops


def _audit(store: InstanceStore, event: str) -> list[AuditEvent]:
    with store.db.session() as s:
        rows = s.execute(select(AuditEvent).where(AuditEvent.event == event)).scalars().all()
        s.expunge_all()
        return list(rows)


def _nothing_left_of(store: InstanceStore, study_uid: str) -> None:
    spool = store.spool
    assert not list(spool.tmp_dir.iterdir())
    assert not (spool.instances_dir / study_uid).exists()
    with store.db.session() as s:
        assert s.execute(select(Study).where(Study.study_uid == study_uid)
                         ).scalar_one_or_none() is None


def _no_patient_values(row: AuditEvent, caplog: pytest.LogCaptureFixture) -> None:
    text = repr(row.detail) + "\n".join(
        r.getMessage() + repr(getattr(r, "dn_fields", "")) for r in caplog.records)
    for secret in ("Secret", "SECRET-ID-42", "19700101", "OTHER-ID", "Other^"):
        assert secret not in text


@pytest.mark.parametrize("study_b_known", [False, True], ids=["new_study", "known_study"])
def test_a_series_uid_already_under_another_study_is_refused_and_audited(
        store: InstanceStore, study_b_known: bool, caplog: pytest.LogCaptureFixture) -> None:
    study_a, study_b, series = generate_uid(), generate_uid(), generate_uid()
    first = [ct_slice(study_a, series, 2.0 * i, i) for i in range(3)]
    for i, ds in enumerate(first):
        store.store_file(_received(store.spool, ds, f"a{i}.dcm"), "SCANNER")
    other = ct_slice(study_b, series, 9.0, 7)
    other.PatientName, other.PatientID = "Other^Person", "OTHER-ID"
    if study_b_known:  # study B and its own series cached: the fast path must not file it
        own = ct_slice(study_b, generate_uid(), 0.0, 0)
        own.PatientName, own.PatientID = other.PatientName, other.PatientID
        store.store_file(_received(store.spool, own, "b0.dcm"), "SCANNER")
    tmp = _received(store.spool, other, "b.dcm")
    caplog.set_level(logging.DEBUG, logger="dicomnode")
    with pytest.raises(InstanceRejectedError) as refused:
        store.store_file(tmp, "INTRUDER")
    tmp.unlink(missing_ok=True)  # the caller's (pynetdicom's) part
    assert refused.value.code == "series_in_other_study"
    assert series in refused.value.reason and study_a in refused.value.reason
    assert len(refused.value.comment) <= 64
    assert _series_of(store, series) == (study_a, sorted(ds.SOPInstanceUID for ds in first))
    assert not list(store.spool.instances_dir.rglob(f"{other.SOPInstanceUID}.dcm"))
    with store.db.session() as s:
        assert s.execute(select(Instance).where(
            Instance.sop_uid == other.SOPInstanceUID)).scalar_one_or_none() is None
        counts = dict(s.execute(select(Study.study_uid, Study.instance_count)).all())
    assert counts[study_a] == 3 and counts.get(study_b, 0) == int(study_b_known)
    [row] = _audit(store, "instance.refused_uid_clash")
    assert (row.study_uid, row.calling_aet) == (study_b, "INTRUDER")
    assert row.detail is not None
    assert row.detail["clash"] == "series_in_other_study"
    assert row.detail["series_uid"] == series and row.detail["other_study_uid"] == study_a
    assert row.detail["sop_uid"] == other.SOPInstanceUID
    _no_patient_values(row, caplog)
    assert "instance.refused_uid_clash" in caplog.text
    if not study_b_known:
        _nothing_left_of(store, study_b)


@pytest.mark.parametrize("new_series", [False, True], ids=["known_series", "new_series"])
def test_a_study_uid_already_under_another_patient_is_refused_and_audited(
        store: InstanceStore, new_series: bool, caplog: pytest.LogCaptureFixture) -> None:
    study, series = generate_uid(), generate_uid()
    first = [ct_slice(study, series, 2.0 * i, i) for i in range(3)]
    for i, ds in enumerate(first):
        store.store_file(_received(store.spool, ds, f"a{i}.dcm"), "SCANNER")
    other = ct_slice(study, generate_uid() if new_series else series, 9.0, 7)
    other.PatientName, other.PatientID = "Other^Person", "OTHER-ID"
    caplog.set_level(logging.DEBUG, logger="dicomnode")
    with pytest.raises(InstanceRejectedError) as refused:
        store.store_file(_received(store.spool, other, "b.dcm"), "INTRUDER")
    assert refused.value.code == "study_of_other_patient"
    assert _series_of(store, series) == (study, sorted(ds.SOPInstanceUID for ds in first))
    with store.db.session() as s:
        assert s.execute(select(Study.instance_count)).scalar_one() == 3
        assert s.execute(select(func.count(Patient.id))).scalar_one() == 1
        assert s.execute(select(func.count(Instance.id))).scalar_one() == 3
    assert not list(store.spool.instances_dir.rglob(f"{other.SOPInstanceUID}.dcm"))
    [row] = _audit(store, "instance.refused_uid_clash")
    assert (row.study_uid, row.calling_aet) == (study, "INTRUDER")
    assert row.detail is not None and row.detail["clash"] == "study_of_other_patient"
    _no_patient_values(row, caplog)


def test_the_same_patient_with_an_issuer_is_another_patient(store: InstanceStore) -> None:
    study = generate_uid()
    store.store_file(_received(store.spool, ct_slice(study, generate_uid(), 0.0, 0), "a.dcm"))
    other = ct_slice(study, generate_uid(), 0.0, 0)
    other.IssuerOfPatientID = "OTHER-HOSPITAL"
    with pytest.raises(InstanceRejectedError) as refused:
        store.store_file(_received(store.spool, other, "b.dcm"))
    assert refused.value.code == "study_of_other_patient"


def test_a_new_series_of_a_known_study_and_patient_is_stored(store: InstanceStore) -> None:
    study = generate_uid()
    store.store_file(_received(store.spool, ct_slice(study, generate_uid(), 0.0, 0), "a.dcm"))
    outcome = store.store_file(_received(store.spool, ct_slice(study, generate_uid(), 0.0, 0),
                                         "b.dcm"))
    assert not outcome.duplicate
    assert not _audit(store, "instance.refused_uid_clash")


def test_a_sop_uid_already_stored_under_another_study_is_refused_and_audited(
        store: InstanceStore, caplog: pytest.LogCaptureFixture) -> None:
    study_a, series_a = generate_uid(), generate_uid()
    first = ct_slice(study_a, series_a, 0.0, 0)
    store.store_file(_received(store.spool, first, "a.dcm"), "SCANNER")
    stored = (store.spool.root / store.spool.relative_path(
        study_a, series_a, first.SOPInstanceUID)).read_bytes()
    study_b = generate_uid()
    other = ct_slice(study_b, generate_uid(), 0.0, 0)
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    caplog.set_level(logging.DEBUG, logger="dicomnode")
    with pytest.raises(InstanceRejectedError) as refused:
        store.store_file(_received(store.spool, other, "b.dcm"), "INTRUDER")
    assert refused.value.code == "sop_conflict"
    assert first.SOPInstanceUID in refused.value.reason
    assert _series_of(store, series_a) == (study_a, [first.SOPInstanceUID])
    assert (store.spool.root / store.spool.relative_path(
        study_a, series_a, first.SOPInstanceUID)).read_bytes() == stored
    [row] = _audit(store, "instance.refused_uid_conflict")
    assert (row.study_uid, row.calling_aet) == (study_b, "INTRUDER")
    assert row.detail is not None
    assert row.detail["sop_uid"] == first.SOPInstanceUID
    assert row.detail["stored_study_uid"] == study_a
    _no_patient_values(row, caplog)
    _nothing_left_of(store, study_b)


def test_a_sop_uid_already_stored_with_other_pixels_is_refused(store: InstanceStore) -> None:
    study, series = generate_uid(), generate_uid()
    first = ct_slice(study, series, 0.0, 0)
    store.store_file(_received(store.spool, first, "a.dcm"))
    changed = ct_slice(study, series, 0.0, 1)  # other pixel values
    changed.SOPInstanceUID = changed.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    changed.InstanceNumber = first.InstanceNumber
    with pytest.raises(InstanceRejectedError) as refused:
        store.store_file(_received(store.spool, changed, "b.dcm"))
    assert refused.value.code == "sop_conflict"
    stored = pydicom.dcmread(store.spool.root / store.spool.relative_path(
        study, series, first.SOPInstanceUID))
    assert stored.PixelData == first.PixelData
    assert not list(store.spool.tmp_dir.iterdir())
    assert len(_audit(store, "instance.refused_uid_conflict")) == 1


def test_a_sop_uid_already_stored_with_another_patient_is_refused(
        store: InstanceStore) -> None:
    study, series = generate_uid(), generate_uid()
    first = ct_slice(study, series, 0.0, 0)
    store.store_file(_received(store.spool, first, "a.dcm"))
    other = copy.deepcopy(first)
    other.PatientID = "OTHER-ID"
    with pytest.raises(InstanceRejectedError) as refused:
        store.store_file(_received(store.spool, other, "b.dcm"))
    assert refused.value.code == "sop_conflict"


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, RLELossless])
def test_a_true_duplicate_in_another_transfer_syntax_is_acknowledged_once(
        store: InstanceStore, syntax: str) -> None:
    study, series = generate_uid(), generate_uid()
    first = ct_slice(study, series, 0.0, 0)
    store.store_file(_received(store.spool, first, "a.dcm"))
    again = copy.deepcopy(first)
    if syntax == RLELossless:
        again.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    else:
        again.file_meta.TransferSyntaxUID = syntax
    again.file_meta.ImplementationVersionName = "OTHER_SENDER"
    outcome = store.store_file(_received(store.spool, again, "b.dcm"))
    assert outcome.duplicate
    assert _series_of(store, series) == (study, [first.SOPInstanceUID])
    stored = pydicom.dcmread(store.spool.root / store.spool.relative_path(
        study, series, first.SOPInstanceUID))
    assert stored.file_meta.TransferSyntaxUID == first.file_meta.TransferSyntaxUID
    assert not list(store.spool.tmp_dir.iterdir())
    assert not _audit(store, "instance.refused_uid_conflict")


def test_a_byte_identical_duplicate_is_acknowledged_once(store: InstanceStore) -> None:
    study, series = generate_uid(), generate_uid()
    first = ct_slice(study, series, 0.0, 0)
    store.store_file(_received(store.spool, first, "a.dcm"))
    assert store.store_file(_received(store.spool, first, "b.dcm")).duplicate
    assert store.store(_encoded(first)).duplicate
    assert not list(store.spool.tmp_dir.iterdir())
    with store.db.session() as s:
        assert s.execute(select(Study.instance_count)).scalar_one() == 1


def test_a_refusal_through_store_leaves_no_temporary_file(store: InstanceStore) -> None:
    study_a, series = generate_uid(), generate_uid()
    store.store(_encoded(ct_slice(study_a, series, 0.0, 0)))
    with pytest.raises(InstanceRejectedError):
        store.store(_encoded(ct_slice(generate_uid(), series, 2.0, 1)))
    assert not list(store.spool.tmp_dir.iterdir())
    assert _series_of(store, series)[0] == study_a
