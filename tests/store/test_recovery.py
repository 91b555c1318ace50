"""Crash safety: a node killed with SIGKILL mid-send loses no acknowledged instance."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from dicomnode.config import Settings
from dicomnode.store.db import Database
from dicomnode.store.instances import InstanceStore
from dicomnode.store.models import Instance, Job
from dicomnode.store.spool import Spool
from tests.conftest import free_port
from tests.factories import ct_slice
from tests.peers import wait_port


def _start_node(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, DICOMNODE_PORT=str(port), DICOMNODE_BIND_ADDRESS="127.0.0.1",
               DICOMNODE_DATA_DIR=str(data_dir), DICOMNODE_DISK_RESERVE_MB="0")
    env.pop("DICOMNODE_CONFIG", None)
    env.pop("DICOMNODE_DATABASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 120)
    return proc


def test_sigkill_during_send_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "var", free_port()
    proc = _start_node(data_dir, port)
    study, series = generate_uid(), generate_uid()
    acked: list[str] = []
    killed = threading.Event()
    try:
        ae = AE(ae_title="CTSCANNER")
        ae.add_requested_context(CTImageStorage)
        for _ in range(5):  # a loaded machine may need a moment after the port opens
            assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
            if assoc.is_established:
                break
            time.sleep(1)
        assert assoc.is_established
        for i in range(400):
            ds = ct_slice(study, series, float(i), i, rows=128, cols=128)
            if len(acked) == 120 and not killed.is_set():
                # Kill while the next C-STORE is in flight.
                threading.Timer(0.002, lambda: (proc.send_signal(signal.SIGKILL),
                                                killed.set())).start()
            try:
                status = assoc.send_c_store(ds)
            except Exception:
                break
            if not assoc.is_established or getattr(status, "Status", None) != 0:
                break
            acked.append(ds.SOPInstanceUID)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert 120 <= len(acked) < 400
    # Restart: recovery runs at start-up.
    proc = _start_node(data_dir, port)
    try:
        db = Database(f"sqlite:///{data_dir / 'dicomnode.db'}")
        with db.session() as s:
            rows = {r.sop_uid: r.path for r in s.execute(select(Instance)).scalars()}
        db.dispose()
        assert set(acked) <= set(rows)
        for uid in acked:
            assert pydicom.dcmread(data_dir / "spool" / rows[uid]).SOPInstanceUID == uid
        assert not list((data_dir / "spool" / "tmp").glob("*.part"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_recover_removes_partials_and_indexes_orphans(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True)
    db = Database(settings.db_url)
    db.upgrade()
    spool = Spool(settings.spool_dir)
    store = InstanceStore(db, spool)
    (spool.tmp_dir / "abc.part").write_bytes(b"half")
    # A whole file renamed into place whose index row never got committed.
    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    spool.write(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [buf.getvalue()])
    store.store(_encoded(ct_slice(ds.StudyInstanceUID, ds.SeriesInstanceUID, 1.0, 1)), "X")
    with db.transaction() as s:
        from dicomnode.store.models import Study

        study = s.execute(select(Study)).scalar_one()
        s.add(Job(study=study, study_version=1, state="running", priority=0, attempts=1))
    report = store.recover()
    assert report.partial_files_removed == 1
    assert report.orphans_indexed == 1
    assert report.jobs_requeued == 1
    assert report.missing_files == 0
    with db.session() as s:
        assert len(s.execute(select(Instance)).scalars().all()) == 2
        assert s.execute(select(Job.state)).scalar_one() == "queued"


def _encoded(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
