"""Store one received instance: check it, spool it durably, index it.

``InstanceStore.store`` is what the C-STORE handler calls; when it returns, the
instance is on disk (fsynced, renamed into place) and its row is committed, so the
sender can be told "success". ``InstanceStore.recover`` runs at start-up.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from dicomnode.logs import fields
from dicomnode.store.db import Database, rowcount
from dicomnode.store.duplicate import same_instance
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


def _retryable(exc: OperationalError) -> bool:
    """A deadlock or serialization failure: the server rolled back, running again is safe."""
    return getattr(exc.orig, "sqlstate", None) in ("40P01", "40001")


class _NeedsFullPathError(Exception):
    """Internal: roll the fast path back and take the full one."""


# The fast path's statements, built once (SQLAlchemy then reuses their compiled form).
_INSERT_INSTANCE = insert(Instance)
_INSERT_KEYS = (
    "sop_uid", "series_pk", "sop_class_uid", "transfer_syntax_uid", "path", "size",
    "instance_number", "image_type", "orientation", "slice_position", "images_in_acquisition",
    "study_version", "calling_aet", "received_at",
)
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


class _DriverStatement:
    """One statement compiled by SQLAlchemy, its parameters laid out for the DBAPI driver.

    Parameters
    ----------
    statement : sqlalchemy.sql.Executable
        Core statement with named bind parameters.
    dialect : sqlalchemy.engine.Dialect
        A dialect with a positional paramstyle (SQLite's ``qmark``).
    keys : tuple of str, optional
        For an INSERT, the columns it sets (all of them given at every execution).
    """

    def __init__(self, statement: Any, dialect: Any, keys: tuple[str, ...] | None = None
                 ) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=keys)
        if not compiled.positiontup:
            raise ValueError("Invalid 'dialect' value - needs a positional paramstyle")
        self.sql = compiled.string
        self.order = tuple(compiled.positiontup)
        # literals such as the "+ 1" of a count (named parameters are always given)
        self.fixed = {key: bind.effective_value for key, bind in compiled.binds.items()}
        # the dialect's own implementation of each type: for DateTime on SQLite, the
        # string form SQLAlchemy stores, not the driver's deprecated default adapter
        self.processors = {key: bind.type.dialect_impl(dialect).bind_processor(dialect)
                           for key, bind in compiled.binds.items()}

    def parameters(self, values: dict[str, Any]) -> tuple[Any, ...]:
        """The driver's positional parameters for ``values`` (bind processors applied)."""
        out = []
        for key in self.order:
            value = values[key] if key in values else self.fixed[key]
            process = self.processors.get(key)
            out.append(process(value) if process is not None else value)
        return tuple(out)


class _DriverIndex:
    """The fast path's three statements on one SQLite DBAPI connection.

    The C-STORE handler indexes every received instance; through SQLAlchemy's
    execution layer the three statements and their transaction cost ~0.3 ms, on the
    sqlite3 connection ~0.06 ms. SQLAlchemy still writes the SQL (compiled once from the
    same Core statements) and converts the values (its bind processors); only the
    per-execution machinery is skipped. Other databases keep the Core path.
    """

    def __init__(self, engine: Any) -> None:
        dialect = engine.dialect
        self.engine = engine
        self.insert = _DriverStatement(_INSERT_INSTANCE, dialect, _INSERT_KEYS)
        self.touch_study = _DriverStatement(_TOUCH_STUDY, dialect)
        self.touch_series = _DriverStatement(_TOUCH_SERIES, dialect)
        self.connection: Any = None

    @staticmethod
    def usable(engine: Any) -> bool:
        """Whether ``engine`` is a SQLite file through the standard library's driver.

        (An in-memory SQLite database is one per connection: not shared, not usable.)
        """
        database = engine.url.database or ""
        return bool(engine.dialect.name == "sqlite" and engine.dialect.driver == "pysqlite"
                    and engine.dialect.paramstyle == "qmark"
                    and database not in ("", ":memory:") and "mode=memory" not in database)

    def run(self, row: dict[str, Any], study: dict[str, Any], series: dict[str, Any],
            before_commit: Callable[[], object] | None) -> bool:
        """Insert the row and bump the counts in one transaction.

        Returns False, with everything rolled back, when the row is a duplicate or the
        study is not receiving at the expected version.
        """
        if self.connection is None:
            self.connection = self.engine.raw_connection()
        conn = self.connection
        cursor = conn.cursor()
        try:
            cursor.execute(self.insert.sql, self.insert.parameters(row))
            cursor.execute(self.touch_study.sql, self.touch_study.parameters(study))
            if cursor.rowcount != 1:
                conn.rollback()
                return False
            cursor.execute(self.touch_series.sql, self.touch_series.parameters(series))
            if before_commit is not None:
                before_commit()
            conn.commit()
        except sqlite3.IntegrityError:
            self._rollback()
            return False
        except sqlite3.DatabaseError:
            # e.g. a disk I/O error: this connection may be unusable; take a new one next
            self._rollback()
            self.close()
            raise
        except BaseException:
            self._rollback()
            raise
        finally:
            cursor.close()
        return True

    def _rollback(self) -> None:
        """Roll back without hiding the error that led here."""
        with contextlib.suppress(Exception):
            self.connection.rollback()

    def close(self) -> None:
        """Give the connection back to the pool (it is taken again when next needed)."""
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.close()
            self.connection = None


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
        # ``begin_store`` runs ``store_file`` here; its flushes go to ``_io``, never to the
        # pool a waiting caller sits in (a full pool would wait on itself).
        self._ingest = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="ingest")
        # Primary keys of rows that never move, and the study version last seen here:
        # a series by (study UID, series UID), a study by (study UID, patient ID, issuer),
        # so that the fast path never files an instance under another study or patient.
        self._series_pk: dict[tuple[str, str], int] = {}
        self._study_key: dict[tuple[str, str, str], tuple[int, int]] = {}
        self._driver = _DriverIndex(db.engine) if _DriverIndex.usable(db.engine) else None

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
            The dataset is not acceptable, or a UID of it is already stored under
            another study or patient or with other content (nothing is written).
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
        flushed: Future[None] | None = None,
    ) -> StoreOutcome:
        """Check, spool and index an instance already written to a file in ``spool/tmp``.

        The C-STORE SCP receives datasets straight into such files (pynetdicom's
        chunked receive), so the bytes reach the page cache while they arrive. Here
        the file is flushed to disk while its header is checked and its index row is
        prepared; the row is committed only after the flush and the rename. When the
        header check refuses it the file is left where it is, for the caller to remove;
        after that it is either placed or, a duplicate or refused by the index, removed.

        Parameters
        ----------
        path : Path
            The received file (preamble, file meta, dataset), on the spool's file system.
        calling_aet, expected_sop_uid, expected_sop_class_uid
            As for ``store``.
        flushed : Future, optional
            ``begin_flush(path)``, when the caller started it already.

        Returns
        -------
        StoreOutcome
        """
        size = path.stat().st_size
        self.spool.check_reserve(0)
        if flushed is None:
            flushed = self.begin_flush(path)
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

    def begin_store(
        self,
        path: Path,
        calling_aet: str = "",
        *,
        expected_sop_uid: str | None = None,
        expected_sop_class_uid: str | None = None,
    ) -> Future[StoreOutcome]:
        """Run ``store_file`` on the ingest threads; the caller acknowledges on its result.

        The C-STORE SCP calls this the moment a dataset's last fragment is in its file,
        before pynetdicom hands the request to the service handler (up to a millisecond
        later); the handler then waits on the future. The order on disk and in the index,
        and the rule "acknowledged only once committed", are those of ``store_file``.

        Returns
        -------
        Future
            Resolves to the ``StoreOutcome``, or raises what ``store_file`` raises.
        """
        # the flush and the check start together, each on its own thread
        flushed = self.begin_flush(path)
        return self._ingest.submit(self.store_file, path, calling_aet,
                                   expected_sop_uid=expected_sop_uid,
                                   expected_sop_class_uid=expected_sop_class_uid,
                                   flushed=flushed)

    def begin_flush(self, path: Path) -> Future[None]:
        """Start flushing a received file to disk on the I/O threads.

        Parameters
        ----------
        path : Path
            A complete file in ``spool/tmp``.

        Returns
        -------
        Future
            Done when the file's data and size are on disk (``Spool.flush``).
        """
        return self._io.submit(Spool.flush, path)

    def _commit(self, header: InstanceHeader, tmp: Path, size: int, calling_aet: str,
                wait_flushed: Callable[[], object] | None) -> StoreOutcome:
        """Index a flushed (or flushing) temporary file and rename it into place.

        Order on disk and in the index: flushed, renamed, then the row committed. A
        duplicate or a refused instance is never placed: its temporary file is removed.
        """
        relative = self.spool.relative_path(header.study_uid, header.series_uid,
                                            header.sop_uid)
        placed: list[SpooledFile] = []

        def flush_and_place() -> SpooledFile:
            if wait_flushed is not None:
                wait_flushed()
            spooled = self.spool.place(tmp, header.study_uid, header.series_uid,
                                       header.sop_uid)
            placed.append(spooled)
            return spooled

        try:
            with self.db.write_lock:
                outcome = None
                if not (self.spool.root / relative).exists():
                    outcome = self._index_fast(header, relative, size, calling_aet,
                                               before_commit=flush_and_place)
                if outcome is None:
                    outcome = self._index_full_retried(header, calling_aet, tmp,
                                                       flush_and_place, placed)
        except BaseException:
            for spooled in placed:
                if spooled.created:
                    self.spool.remove(spooled.relative)
            if not placed:
                _discard_when_flushed(tmp, wait_flushed)
            raise
        if not placed:  # a duplicate: the stored file stays, the received one goes
            _discard_when_flushed(tmp, wait_flushed)
        return outcome

    def _index_full_retried(self, header: InstanceHeader, calling_aet: str, tmp: Path,
                            place: Callable[[], SpooledFile], placed: list[SpooledFile],
                            attempts: int = 3) -> StoreOutcome:
        """``_index_full``, again when another process committed the same new row first.

        Several listeners (or nodes) on one PostgreSQL index may create the same patient,
        study or series at the same moment: the loser's commit breaks a unique constraint
        and is rolled back. Run again, it finds the winner's rows and files the instance
        under them; the file is placed once (the second run compares against it).
        """
        for attempt in range(1, attempts + 1):
            try:
                if placed:  # the file is in place already: compare against it
                    return self._index_full(header, calling_aet, placed[-1].path,
                                            lambda: placed[-1])
                return self._index_full(header, calling_aet, tmp, place)
            except (IntegrityError, OperationalError) as exc:
                if attempt == attempts or (isinstance(exc, OperationalError)
                                           and not _retryable(exc)):
                    raise
                log.info("instance.index_retried", extra=fields(
                    study=header.study_uid, sop=header.sop_uid, attempt=attempt))
        raise AssertionError("unreachable")

    def _index(self, header: InstanceHeader, spooled: SpooledFile, calling_aet: str,
               ) -> StoreOutcome:
        """Index an instance already in place (recovery)."""
        with self.db.write_lock:
            fast = self._index_fast(header, spooled.relative, spooled.size, calling_aet)
            if fast is not None:
                return fast
            return self._index_full(header, calling_aet, spooled.path, lambda: spooled)

    def _index_fast(self, header: InstanceHeader, relative: str, size: int, calling_aet: str,
                    before_commit: Callable[[], object] | None = None) -> StoreOutcome | None:
        """The common case in three statements: the study is receiving, the series known.

        ``before_commit`` runs after the statements, before the commit (the caller
        flushes and renames the file there). Returns None, having written nothing and
        not called ``before_commit``, when the full path is needed: a new study or
        series, a study to re-open, a duplicate, or a UID clash. The caches hold only
        a series that the full path indexed under this very study and a study under
        this very patient (their keys say so), so a series or study UID that another
        study or patient holds always takes the full path and its checks.
        """
        known = self._study_key.get((header.study_uid, header.patient_id, header.issuer))
        series_pk = self._series_pk.get((header.study_uid, header.series_uid))
        if known is None or series_pk is None:
            return None
        study_pk, version = known
        now = utcnow()
        row = {
            "sop_uid": header.sop_uid, "series_pk": series_pk,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "path": relative, "size": size,
            "instance_number": header.instance_number,
            "image_type": header.image_type, "orientation": header.orientation,
            "slice_position": header.slice_position,
            "images_in_acquisition": header.images_in_acquisition,
            "study_version": version, "calling_aet": calling_aet, "received_at": now,
        }
        study = {"pk": study_pk, "v": version, "now": now,
                 "receiving": StudyState.RECEIVING.value}
        if self._driver is not None:
            if not self._driver.run(row, study, {"pk": series_pk}, before_commit):
                return None  # rolled back: a duplicate or a study that is not receiving
            return StoreOutcome(header.sop_uid, header.study_uid, header.series_uid,
                                duplicate=False, reopened=False, study_version=version)
        try:
            with self.db.engine.begin() as conn:
                # the study row first, as the full path locks it first: taken the other
                # way round, two listeners filing the same instance deadlocked (PostgreSQL)
                if rowcount(conn.execute(_TOUCH_STUDY, study)) != 1:
                    raise _NeedsFullPathError
                conn.execute(_INSERT_INSTANCE, row)
                conn.execute(_TOUCH_SERIES, {"pk": series_pk})
                if before_commit is not None:
                    before_commit()
        except (IntegrityError, _NeedsFullPathError):
            return None  # rolled back: a duplicate or a study that is not receiving
        except OperationalError as exc:
            if not _retryable(exc):
                raise
            return None  # rolled back by the server: the full path files it again
        return StoreOutcome(header.sop_uid, header.study_uid, header.series_uid,
                            duplicate=False, reopened=False, study_version=version)

    def _index_full(self, header: InstanceHeader, calling_aet: str, received: Path,
                    place: Callable[[], SpooledFile]) -> StoreOutcome:
        """Check the instance against the index, then place it and commit its rows.

        ``received`` is the file as it arrived; ``place`` puts it into the spool, only
        when the instance is neither a duplicate nor refused. A UID already stored
        under another study or patient, or with other content, is refused and audited.
        """
        with self.db.transaction() as session:
            stored = session.execute(
                select(Instance.path, Series.series_uid, Study.study_uid,
                       Patient.patient_id, Patient.issuer)
                .join(Series, Instance.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id)
                .join(Patient, Study.patient_pk == Patient.id)
                .where(Instance.sop_uid == header.sop_uid)
            ).one_or_none()
            if stored is not None:
                refusal = self._duplicate_or_conflict(header, received, *stored)
            else:
                refusal = _uid_clash(session, header)
            if refusal is None and stored is not None:
                return StoreOutcome(header.sop_uid, header.study_uid, header.series_uid,
                                    duplicate=True, reopened=False, study_version=0)
            if refusal is None:
                spooled = place()
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
                series_pk = series.id
                study_key = (study.id, study.version)
                outcome = StoreOutcome(header.sop_uid, header.study_uid, header.series_uid,
                                       duplicate=False, reopened=reopened,
                                       study_version=study.version)
        if refusal is not None:  # audited once the checking transaction is over
            self._refuse(header, refusal, calling_aet)
        # only once committed; checked above: the series is this study's, the study this
        # patient's
        self._series_pk[(header.study_uid, header.series_uid)] = series_pk
        self._study_key[(header.study_uid, header.patient_id, header.issuer)] = study_key
        return outcome

    def _duplicate_or_conflict(self, header: InstanceHeader, received: Path, path: str,
                               series_uid: str, study_uid: str, patient_id: str, issuer: str,
                               ) -> _Refusal | None:
        """None for a true duplicate of the stored instance, else why it is refused."""
        if study_uid != header.study_uid:
            differs, where = "study", f"in another study ({study_uid})"
            comment = "SOP Instance UID already stored in another study; refused"
        elif series_uid != header.series_uid:
            differs, where = "series", f"in another series ({series_uid})"
            comment = "SOP Instance UID already stored in another series; refused"
        elif (patient_id, issuer) != (header.patient_id, header.issuer):
            differs, where = "patient", "for another patient"
            comment = "SOP Instance UID already stored for another patient; refused"
        else:
            stored = self.spool.root / path
            if received == stored or same_instance(stored, received):
                return None
            differs, where = "content", "with other content"
            comment = "SOP Instance UID already stored with other content; refused"
        return _Refusal(
            "instance.refused_uid_conflict",
            InstanceRejectedError(
                f"SOP Instance UID {header.sop_uid} already stored {where}; refused so that "
                "the stored instance is neither replaced nor merged with another",
                "sop_conflict", comment),
            {"conflict": differs, "sop_uid": header.sop_uid,
             "series_uid": header.series_uid, "stored_study_uid": study_uid,
             "stored_series_uid": series_uid},
        )

    def _refuse(self, header: InstanceHeader, refusal: _Refusal, calling_aet: str) -> NoReturn:
        """Audit and log a refusal by the index (UIDs only), then raise it."""
        try:
            with self.db.transaction() as session:
                session.add(AuditEvent(event=refusal.event, study_uid=header.study_uid,
                                       calling_aet=calling_aet[:16], detail=refusal.detail))
        except SQLAlchemyError:
            log.exception("audit.failed", extra=fields(event=refusal.event))
        log.warning(refusal.event, extra=fields(study=header.study_uid,
                                                calling_aet=calling_aet, **refusal.detail))
        raise refusal.error

    def close(self) -> None:
        """Wait for writes in progress, stop the I/O threads, release the connection."""
        self._ingest.shutdown(wait=True)
        self._io.shutdown(wait=True)
        with self.db.write_lock:
            if self._driver is not None:
                self._driver.close()

    def recover(self, requeue_jobs: bool = True) -> RecoveryReport:
        """Make the spool and the index agree after a crash or power loss.

        Removes half-written temporary files, reports indexed instances whose file
        is gone, indexes complete spool files that were never indexed (written but
        not acknowledged), puts running jobs (unless ``requeue_jobs`` is false: workers
        of a task queue run them) and sending deliveries back in the queue.

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
            try:
                self._index(header, SpooledFile(path, rel, path.stat().st_size, False), "")
            except InstanceRejectedError as exc:  # audited; the file is left for a person
                log.warning("spool.orphan_refused", extra=fields(path=rel, reason=exc.code))
                continue
            orphans += 1
        with self.db.transaction() as session:
            jobs = rowcount(session.execute(
                update(Job).where(Job.state == JobState.RUNNING.value)
                .values(state=JobState.QUEUED.value)
            )) if requeue_jobs else 0
            deliveries = rowcount(session.execute(
                update(Delivery).where(Delivery.state == DeliveryState.SENDING.value)
                .values(state=DeliveryState.PENDING.value)
            ))
            report = RecoveryReport(partial, missing, orphans, jobs or 0, deliveries or 0)
            if partial or missing or orphans or jobs or deliveries:
                session.add(AuditEvent(event="node.recovered", detail=report.__dict__))
        log.info("node.recovered", extra=fields(**report.__dict__))
        return report


def _identify(data: bytes) -> tuple[str, str, str] | None:
    try:
        header = parse_header(data)
    except InstanceRejectedError:
        return None
    return header.study_uid, header.series_uid, header.sop_uid


def _discard_when_written(pending: Future[Path]) -> None:
    with contextlib.suppress(OSError):  # write_temp cleans up after itself when it fails
        Spool.discard(pending.result())


def _discard_when_flushed(tmp: Path, wait_flushed: Callable[[], object] | None) -> None:
    """Remove a received file that is not placed, once its flush (if any) is over."""
    if wait_flushed is not None:
        with contextlib.suppress(OSError):
            wait_flushed()
    Spool.discard(tmp)


@dataclass(frozen=True)
class _Refusal:
    """An instance the index refuses: the audit event, the error, the audit detail."""

    event: str
    error: InstanceRejectedError
    detail: dict[str, str]


def _uid_clash(session: Session, header: InstanceHeader) -> _Refusal | None:
    """Why a new instance would merge two studies' or two patients' data, or None.

    A series UID already indexed under another study, or a study UID already indexed
    under another patient (PatientID + IssuerOfPatientID), means two senders' UIDs
    collide (or one sender's are broken): filing the instance would put one patient's
    image into another's series or study, and that study's pipeline would read it.
    """
    other_study = session.execute(
        select(Study.study_uid).join(Series, Series.study_pk == Study.id)
        .where(Series.series_uid == header.series_uid)
    ).scalar_one_or_none()
    if other_study is not None and other_study != header.study_uid:
        reason = (f"Series Instance UID {header.series_uid} already belongs to study "
                  f"{other_study}; refused so that two studies' images are not merged")
        return _Refusal(
            "instance.refused_uid_clash",
            InstanceRejectedError(reason, "series_in_other_study",
                                  "Series Instance UID already belongs to another study; "
                                  "refused"),
            {"clash": "series_in_other_study", "sop_uid": header.sop_uid,
             "series_uid": header.series_uid, "other_study_uid": other_study},
        )
    patient = session.execute(
        select(Patient.patient_id, Patient.issuer).join(Study, Study.patient_pk == Patient.id)
        .where(Study.study_uid == header.study_uid)
    ).one_or_none()
    if patient is not None and tuple(patient) != (header.patient_id, header.issuer):
        differs = [kw for kw, a, b in (("PatientID", patient[0], header.patient_id),
                                       ("IssuerOfPatientID", patient[1], header.issuer))
                   if a != b]
        reason = (f"Study Instance UID {header.study_uid} already belongs to another "
                  f"patient ({' and '.join(differs)} differ); refused so that two "
                  "patients' images are not merged")
        return _Refusal(
            "instance.refused_uid_clash",
            InstanceRejectedError(reason, "study_of_other_patient",
                                  "Study Instance UID already belongs to another patient; "
                                  "refused"),
            {"clash": "study_of_other_patient", "sop_uid": header.sop_uid,
             "series_uid": header.series_uid, "differs": " ".join(differs)},
        )
    return None


def _study_for(session: Session, header: InstanceHeader, calling_aet: str,
               ) -> tuple[Study, bool]:
    # PostgreSQL: the row is locked until commit, so two listeners that file into (or
    # re-open) one study at once count its instances and versions one after the other
    study = session.execute(
        select(Study).where(Study.study_uid == header.study_uid).with_for_update()
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
        superseded = rowcount(session.execute(
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
