"""InstanceStore's two index paths (SQLite driver, SQLAlchemy Core) give the same rows."""

from __future__ import annotations

from datetime import datetime
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.store import instances
from dicomnode.store.db import Database
from dicomnode.store.instances import InstanceStore
from dicomnode.store.models import Instance, Series, Study
from dicomnode.store.spool import Spool
from tests.factories import ct_slice


def _received(spool: Spool, ds: object, name: str) -> Path:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # type: ignore[attr-defined]
    path = spool.tmp_dir / name
    path.write_bytes(buf.getvalue())
    return path


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
