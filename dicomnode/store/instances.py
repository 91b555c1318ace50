"""Store one received instance: check it, spool it durably, index it.

``InstanceStore.store`` is what the C-STORE handler calls; when it returns, the
instance is on disk (fsynced, renamed into place) and its row is committed, so the
sender can be told "success". ``InstanceStore.recover`` runs at start-up.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicomnode.logs import fields
from dicomnode.store.db import Database
from dicomnode.store.header import InstanceHeader, InstanceRejectedError, parse_header
from dicomnode.store.models import (
    AuditEvent,
    Instance,
    Job,
    JobState,
    Patient,
    Series,
    Study,
    StudyState,
    utcnow,
)
from dicomnode.store.spool import Spool, SpooledFile

log = logging.getLogger(__name__)


class _NeedsFullPathError(Exception):
    """Internal: roll the fast path back and take the full one."""


# The fast path's statements, built once (SQLAlchemy then reuses their compiled form).
_INSERT_INSTANCE = insert(Instance)
_TOUCH_STUDY = (
    update(Study)
    .where(Study.id == bindparam("pk"), Study.state == bindparam("receiving"),
           Study.version == bindparam("v"))
    .values(instance_count=Study.instance_count + 1, last_received_at=bindparam("now"))
)
_TOUCH_SERIES = (
    update(Series).where(Series.id == bindparam("pk"))
    .values(instance_count=Series.instance_count + 1)
)


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one received instance."""

    sop_uid: str
    study_uid: str
    series_uid: str
    duplicate: bool
    reopened: bool
    study_version: int


@dataclass(frozen=True)
class RecoveryReport:
    """What start-up recovery found."""

    partial_files_removed: int
    missing_files: int
    orphans_indexed: int
    jobs_requeued: int
    deliveries_requeued: int


class InstanceStore:
    """The spool and the index, kept consistent.

    Parameters
    ----------
    db : Database
        The index.
    spool : Spool
        The durable file store.
    """

    def __init__(self, db: Database, spool: Spool, io_threads: int = 16) -> None:
        self.db = db
        self.spool = spool
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="spool-io")
        # Primary keys of rows that never move, and the study version last seen here.
        self._series_pk: dict[str, int] = {}
        self._study_key: dict[str, tuple[int, int]] = {}

    def store(
        self,
        encoded: bytes | memoryview,
        calling_aet: str = "",
        *,
        expected_sop_uid: str | None = None,
        expected_sop_class_uid: str | None = None,
    ) -> StoreOutcome:
        """Check, spool and index one encoded instance.

        Parameters
        ----------
        encoded : bytes
            The instance as a DICOM file (preamble, file meta, dataset).
        calling_aet : str
            Who sent it (the results go back there by default).
        expected_sop_uid, expected_sop_class_uid : str, optional
            From the C-STORE request, checked against the dataset.

        Returns
        -------
        StoreOutcome

        Raises
        ------
        InstanceRejectedError
            The dataset is not acceptable (nothing is written).
        SpoolFullError
            Free space is below the reserve (nothing is written).
        """
        self.spool.check_reserve(len(encoded))
        # The disk flushes the bytes while the header is checked; nothing is placed
        # under instances/ unless the check passes.
        pending = self._io.submit(self.spool.write_temp, [encoded])
        try:
            header = parse_header(
                encoded, expected_sop_uid=expected_sop_uid,
                expected_sop_class_uid=expected_sop_class_uid,
            )
        except BaseException:
            _discard_when_written(pending)
            raise
        return self._commit(header, pending.result(), len(encoded), calling_aet, None)

    def store_file(
        self,
        path: Path,
        calling_aet: str = "",
        *,
        expected_sop_uid: str | None = None,
        expected_sop_class_uid: str | None = None,
    ) -> StoreOutcome:
        """Check, spool and index an instance already written to a file in ``spool/tmp``.

        The C-STORE SCP receives datasets straight into such files (pynetdicom's
        chunked receive), so the bytes reach the page cache while they arrive. Here
        the file is flushed to disk while its header is checked and its index row is
        prepared; the row is committed only after the flush and the rename. On a
        refusal the file is left where it is, for the caller to remove.

        Parameters
        ----------
        path : Path
            The received file (preamble, file meta, dataset), on the spool's file system.
        calling_aet, expected_sop_uid, expected_sop_class_uid
            As for ``store``.

        Returns
        -------
        StoreOutcome
        """
        size = path.stat().st_size
        self.spool.check_reserve(0)
        flushed = self._io.submit(Spool.flush, path)
        try:
            header = parse_header(
                path, expected_sop_uid=expected_sop_uid,
                expected_sop_class_uid=expected_sop_class_uid,
            )
        except BaseException:
            with contextlib.suppress(OSError):
                flushed.result()
            raise
        return self._commit(header, path, size, calling_aet, flushed.result)

    def _commit(self, header: InstanceHeader, tmp: Path, size: int, calling_aet: str,
                wait_flushed: Callable[[], object] | None) -> StoreOutcome:
        """Index a flushed (or flushing) temporary file and rename it into place.

        Order on disk and in the index: flushed, renamed, then the row committed.
        """
        relative = self.spool.relative_path(header.study_uid, header.series_uid,
                                            header.sop_uid)
        placed: list[SpooledFile] = []

        def flush_and_place() -> None:
            if wait_flushed is not None:
                wait_flushed()
            placed.append(self.spool.place(tmp, header.study_uid, header.series_uid,
                                           header.sop_uid))

        with self.db.write_lock:
            if not (self.spool.root / relative).exists():
                try:
                    fast = self._index_fast(header, relative, size, calling_aet,
                                            before_commit=flush_and_place)
                except BaseException:
                    for spooled in placed:
                        if spooled.created:
                            self.spool.remove(spooled.relative)
                    raise
                if fast is not None:
                    return fast
            if not placed:
                flush_and_place()
            spooled = placed[0]
            try:
                return self._index_full(header, spooled, calling_aet)
            except BaseException:
                if spooled.created:
                    self.spool.remove(spooled.relative)
                raise

    def _index(self, header: InstanceHeader, spooled: SpooledFile, calling_aet: str,
               ) -> StoreOutcome:
        """Index an instance already in place (recovery)."""
        with self.db.write_lock:
            fast = self._index_fast(header, spooled.relative, spooled.size, calling_aet)
            if fast is not None:
                return fast
            return self._index_full(header, spooled, calling_aet)

    def _index_fast(self, header: InstanceHeader, relative: str, size: int, calling_aet: str,
                    before_commit: Callable[[], object] | None = None) -> StoreOutcome | None:
        """The common case in three statements: the study is receiving, the series known.

        ``before_commit`` runs after the statements, before the commit (the caller
        flushes and renames the file there). Returns None, having written nothing and
        not called ``before_commit``, when the full path is needed: a new study or
        series, a study to re-open, or a duplicate.
        """
        known = self._study_key.get(header.study_uid)
        series_pk = self._series_pk.get(header.series_uid)
        if known is None or series_pk is None:
            return None
        study_pk, version = known
        now = utcnow()
        try:
            with self.db.engine.begin() as conn:
                conn.execute(_INSERT_INSTANCE, {
                    "sop_uid": header.sop_uid, "series_pk": series_pk,
                    "sop_class_uid": header.sop_class_uid,
                    "transfer_syntax_uid": header.transfer_syntax_uid,
                    "path": relative, "size": size,
                    "instance_number": header.instance_number,
                    "image_type": header.image_type, "orientation": header.orientation,
                    "slice_position": header.slice_position,
                    "images_in_acquisition": header.images_in_acquisition,
                    "study_version": version, "calling_aet": calling_aet, "received_at": now,
                })
                touched = _rowcount(conn.execute(
                    _TOUCH_STUDY, {"pk": study_pk, "v": version, "now": now,
                                   "receiving": StudyState.RECEIVING.value}))
                if touched != 1:
                    raise _NeedsFullPathError
                conn.execute(_TOUCH_SERIES, {"pk": series_pk})
                if before_commit is not None:
                    before_commit()
        except (IntegrityError, _NeedsFullPathError):
            return None  # rolled back: a duplicate or a study that is not receiving
        return StoreOutcome(header.sop_uid, header.study_uid, header.series_uid,
                            duplicate=False, reopened=False, study_version=version)

    def _index_full(self, header: InstanceHeader, spooled: SpooledFile, calling_aet: str,
                    ) -> StoreOutcome:
        with self.db.transaction() as session:
            existing = session.execute(
                select(Instance.path).where(Instance.sop_uid == header.sop_uid)
            ).scalar_one_or_none()
            if existing is not None:
                if spooled.created and spooled.relative != existing:
                    self.spool.remove(spooled.relative)
                return StoreOutcome(header.sop_uid, header.study_uid, header.series_uid,
                                    duplicate=True, reopened=False, study_version=0)
            study, reopened = _study_for(session, header, calling_aet)
            series = session.execute(
                select(Series).where(Series.series_uid == header.series_uid)
            ).scalar_one_or_none()
            if series is None:
                series = Series(
                    series_uid=header.series_uid, study=study, modality=header.modality,
                    series_number=header.series_number,
                    description=header.series_description, body_part=header.body_part,
                    instance_count=0,
                )
                session.add(series)
            series.instance_count += 1
            now = utcnow()
            session.add(Instance(
                sop_uid=header.sop_uid, series=series, sop_class_uid=header.sop_class_uid,
                transfer_syntax_uid=header.transfer_syntax_uid, path=spooled.relative,
                size=spooled.size, instance_number=header.instance_number,
                image_type=header.image_type, orientation=header.orientation,
                slice_position=header.slice_position,
                images_in_acquisition=header.images_in_acquisition,
                study_version=study.version, calling_aet=calling_aet, received_at=now,
            ))
            study.instance_count += 1
            study.last_received_at = now
            session.flush()
            series_uid, series_pk = series.series_uid, series.id
            study_key = (study.id, study.version)
            outcome = StoreOutcome(header.sop_uid, header.study_uid, header.series_uid,
                                duplicate=False, reopened=reopened, study_version=study.version)
        self._series_pk[series_uid] = series_pk  # only once committed
        self._study_key[header.study_uid] = study_key
        return outcome

    def close(self) -> None:
        """Wait for writes in progress and stop the I/O threads."""
        self._io.shutdown(wait=True)

    def recover(self) -> RecoveryReport:
        """Make the spool and the index agree after a crash or power loss.

        Removes half-written temporary files, reports indexed instances whose file
        is gone, indexes complete spool files that were never indexed (written but
        not acknowledged), puts running jobs and sending deliveries back in the queue.

        Returns
        -------
        RecoveryReport
        """
        from dicomnode.store.models import Delivery, DeliveryState

        partial, _placed = self.spool.recover(_identify)
        with self.db.session() as session:
            indexed = set(session.execute(select(Instance.path)).scalars())
        missing = sum(1 for rel in indexed if not (self.spool.root / rel).is_file())
        if missing:
            log.error("spool.missing_files", extra=fields(count=missing))
        orphans = 0
        for rel in self.spool.iter_instances():
            if rel in indexed:
                continue
            path = self.spool.root / rel
            try:
                header = parse_header(path.read_bytes())
            except (InstanceRejectedError, OSError) as exc:
                log.warning("spool.orphan_unreadable", extra=fields(path=rel, reason=str(exc)))
                continue
            self._index(header, SpooledFile(path, rel, path.stat().st_size, False), "")
            orphans += 1
        with self.db.transaction() as session:
            jobs = _rowcount(session.execute(
                update(Job).where(Job.state == JobState.RUNNING.value)
                .values(state=JobState.QUEUED.value)
            ))
            deliveries = _rowcount(session.execute(
                update(Delivery).where(Delivery.state == DeliveryState.SENDING.value)
                .values(state=DeliveryState.PENDING.value)
            ))
            report = RecoveryReport(partial, missing, orphans, jobs or 0, deliveries or 0)
            if partial or missing or orphans or jobs or deliveries:
                session.add(AuditEvent(event="node.recovered", detail=report.__dict__))
        log.info("node.recovered", extra=fields(**report.__dict__))
        return report


def _rowcount(result: object) -> int:
    """Rows an UPDATE touched (a CursorResult's rowcount; typed as Result by SQLAlchemy)."""
    return int(getattr(result, "rowcount", 0) or 0)


def _identify(data: bytes) -> tuple[str, str, str] | None:
    try:
        header = parse_header(data)
    except InstanceRejectedError:
        return None
    return header.study_uid, header.series_uid, header.sop_uid


def _discard_when_written(pending: Future[Path]) -> None:
    with contextlib.suppress(OSError):  # write_temp cleans up after itself when it fails
        Spool.discard(pending.result())


def _study_for(session: Session, header: InstanceHeader, calling_aet: str,
               ) -> tuple[Study, bool]:
    study = session.execute(
        select(Study).where(Study.study_uid == header.study_uid)
    ).scalar_one_or_none()
    if study is None:
        patient = session.execute(
            select(Patient).where(Patient.patient_id == header.patient_id,
                                  Patient.issuer == header.issuer)
        ).scalar_one_or_none()
        if patient is None:
            patient = Patient(patient_id=header.patient_id, issuer=header.issuer)
            session.add(patient)
        study = Study(
            study_uid=header.study_uid, patient=patient,
            accession_number=header.accession_number, study_date=header.study_date,
            calling_aet=calling_aet, state=StudyState.RECEIVING.value, version=1,
            instance_count=0,
        )
        session.add(study)
        session.add(AuditEvent(event="study.receiving", study_uid=header.study_uid,
                               calling_aet=calling_aet))
        return study, False
    if study.state == StudyState.COMPLETE.value:
        study.state = StudyState.RECEIVING.value
        study.version += 1
        study.completion_trigger = None
        study.completed_at = None
        superseded = _rowcount(session.execute(
            update(Job)
            .where(Job.study_pk == study.id, Job.state == JobState.QUEUED.value)
            .values(state=JobState.SUPERSEDED.value, reason="a later instance re-opened the study")
        ))
        session.add(AuditEvent(
            event="study.reopened", study_uid=study.study_uid, calling_aet=calling_aet,
            detail={"version": study.version, "jobs_superseded": superseded},
        ))
        log.info("study.reopened", extra=fields(study=study.study_uid, version=study.version))
        return study, True
    return study, False
