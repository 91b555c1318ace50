"""Several processes on one PostgreSQL index: listeners storing instances of the same
studies at once, workers claiming jobs at once; no row is lost and none is doubled."""

from __future__ import annotations

import multiprocessing
import queue
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import func, select

from dicomnode.config import load_settings
from dicomnode.store.db import Database
from dicomnode.store.instances import InstanceStore
from dicomnode.store.models import Instance, Job, Patient, Series, Study, StudyState
from dicomnode.store.spool import Spool
from dicomnode.workflow.export import Outbox
from dicomnode.workflow.jobs import JobRunner
from tests.factories import ct_slice
from tests.postgres import PostgresServer

WRITERS = 4


def _encode(study: str, series: str, index: int) -> bytes:
    from io import BytesIO

    ds = ct_slice(study, series, float(index), index, rows=8, cols=8,
                  frame_uid=generate_uid(entropy_srcs=[series]))
    # the same slice from two writers is the same instance
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = \
        generate_uid(entropy_srcs=[series, str(index)])
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _store_worker(url: str, spool_dir: str, jobs: list[tuple[str, str, int]],
                  start: multiprocessing.synchronize.Event, out: multiprocessing.Queue,
                  ) -> None:
    db = Database(url)
    store = InstanceStore(db, Spool(Path(spool_dir), reserve_bytes=0), io_threads=2)
    start.wait(60)
    duplicates = 0
    for study, series, index in jobs:
        duplicates += store.store(_encode(study, series, index), "CT").duplicate
    store.close()
    db.dispose()
    out.put(duplicates)


def _claim_worker(url: str, data_dir: str, name: str,
                  start: multiprocessing.synchronize.Event, out: multiprocessing.Queue,
                  ) -> None:
    settings = load_settings(None, data_dir=Path(data_dir), database_url=url, workers=0,
                             warm_up=False, seg_writer_process=False, disk_reserve_mb=0)
    db = Database(url)
    runner = JobRunner(db, settings, Outbox(db, settings))
    start.wait(60)
    claimed = []
    while (job := runner._claim(name)) is not None:
        claimed.append(job["id"])
    db.dispose()
    out.put(claimed)


def _run(target: object, args: list[tuple[object, ...]]) -> list[object]:
    """Run ``target`` in one spawned process per argument tuple, released together."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, start, out))  # type: ignore[arg-type]
             for a in args]
    for proc in procs:
        proc.start()
    start.set()
    results: list[object] = []
    try:
        while len(results) < len(procs):
            try:
                results.append(out.get(timeout=1))
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not failed, f"a writer process failed: exit codes {failed}"
    finally:
        for proc in procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
    return results


def test_listeners_storing_the_same_studies_at_once_lose_and_double_nothing(
        postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.create_database()
    Database(url).upgrade()
    studies = [(generate_uid(), generate_uid()) for _ in range(3)]
    slices = [(study, series, i) for study, series in studies for i in range(24)]
    # every writer gets every fourth slice of every study, and each slice a second time
    # from the next writer (the sender retried on another listener)
    shares = [[s for n, s in enumerate(slices) if n % WRITERS in (w, (w + 1) % WRITERS)]
              for w in range(WRITERS)]
    duplicates = _run(_store_worker, [(url, str(tmp_path / "spool"), share)
                                      for share in shares])
    assert sum(duplicates) == len(slices)  # type: ignore[arg-type]
    db = Database(url)
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == len(slices)
        assert session.scalar(select(func.count()).select_from(Patient)) == 1
        assert session.scalar(select(func.count()).select_from(Series)) == len(studies)
        rows = session.execute(select(Study)).scalars().all()
        assert sorted(s.study_uid for s in rows) == sorted(s for s, _ in studies)
        assert {(s.instance_count, s.version, s.state) for s in rows} == {
            (24, 1, StudyState.RECEIVING.value)}
        assert {s.instance_count for s in session.execute(select(Series)).scalars()} == {24}
    db.dispose()


def test_workers_claiming_jobs_at_once_take_each_job_exactly_once(
        postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.create_database()
    db = Database(url)
    db.upgrade()
    with db.transaction() as session:
        patient = Patient(patient_id="", issuer="")
        study = Study(study_uid=generate_uid(), patient=patient, version=1)
        session.add_all([Job(study=study, study_version=1, pipeline="liver_tumor",
                             priority=50 + n % 3) for n in range(60)])
    claimed = _run(_claim_worker, [(url, str(tmp_path / "var"), f"w{n}")
                                   for n in range(WRITERS)])
    ids = [job for batch in claimed for job in batch]  # type: ignore[attr-defined]
    assert len(ids) == 60 and len(set(ids)) == 60
    with db.session() as session:
        assert {j.attempts for j in session.execute(select(Job)).scalars()} == {1}
    db.dispose()
