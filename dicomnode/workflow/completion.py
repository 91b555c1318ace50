"""When is a study complete? Three triggers, each configurable, the one that fired recorded.

- ``quiet_period``: no instance of the study for ``quiet_period_s`` (sliding).
- ``association_release``: the association that carried the study was released and
  every image series of the study is geometrically contiguous: at least
  ``min_slices`` slices, one orientation, no duplicate position, consistent spacing
  and no gap. Fires at once.
- ``expected_count``: every image series of the study carries Images in Acquisition
  and has reached it.

Completion writes the study's state and queues a job for that study version in one
transaction. A later instance re-opens the study (see ``store/instances.py``).
"""

from __future__ import annotations

import itertools
import logging
import statistics
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.config import CompletionSettings
from dicomnode.logs import fields
from dicomnode.metrics import NodeMetrics
from dicomnode.store.db import Database
from dicomnode.store.models import AuditEvent, Instance, Job, Series, Study, StudyState, utcnow

log = logging.getLogger(__name__)

QUIET_PERIOD = "quiet_period"
ASSOCIATION_RELEASE = "association_release"
EXPECTED_COUNT = "expected_count"

#: Queue priority of the routing job a completion creates (routing is quick: it goes
#: ahead of pipeline jobs of normal priority, behind urgent ones).
ROUTING_PRIORITY = 90

# Storage classes whose instances are slices of a volume (single-frame images).
SLICE_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.128",  # PET Image Storage
})


@dataclass(frozen=True)
class SeriesGeometry:
    """The slice geometry facts of one series, as indexed."""

    series_uid: str
    orientations: frozenset[str]
    positions: tuple[float, ...]


def contiguity_problem(geometry: SeriesGeometry, min_slices: int = 3) -> str | None:
    """Why a series is not (yet) a contiguous stack, or None if it is.

    Parameters
    ----------
    geometry : SeriesGeometry
        Orientations and slice positions (along the normal) of the series' slices.
    min_slices : int
        Fewer slices than this is never contiguous.

    Returns
    -------
    str or None
    """
    if len(geometry.orientations) > 1:
        return "mixed orientations"
    positions = sorted(geometry.positions)
    if len(positions) < min_slices:
        return f"{len(positions)} slices, fewer than {min_slices}"
    steps = [b - a for a, b in itertools.pairwise(positions)]
    if min(steps) < 1e-3:
        return "duplicate slice positions"
    median = statistics.median(steps)
    if max(steps) > 1.5 * median:
        return f"gap of {max(steps):.2f} mm where spacing is {median:.2f} mm"
    if max(abs(s - median) for s in steps) > 0.1 * median + 0.01:
        return "non-uniform spacing"
    return None


def _image_series(session: Session, study: Study) -> dict[str, list[Instance]]:
    rows = session.execute(
        select(Series.series_uid, Instance)
        .join(Instance, Instance.series_pk == Series.id)
        .where(Series.study_pk == study.id, Instance.study_version <= study.version)
    ).all()
    by_series: dict[str, list[Instance]] = {}
    for series_uid, inst in rows:
        if inst.sop_class_uid not in SLICE_SOP_CLASSES or inst.slice_position is None:
            continue
        if "LOCALIZER" in inst.image_type.upper():
            continue
        by_series.setdefault(series_uid, []).append(inst)
    return by_series


class CompletionMonitor:
    """Decides completion and queues jobs.

    Parameters
    ----------
    db : Database
        The index.
    settings : CompletionSettings
        Which triggers are on and their parameters.
    on_complete : callable, optional
        Called with the study UID after each completion is committed.
    metrics : NodeMetrics, optional
        Where completions are counted by trigger (default: a registry of its own).
    """

    def __init__(self, db: Database, settings: CompletionSettings,
                 on_complete: Callable[[str], object] | None = None,
                 metrics: NodeMetrics | None = None) -> None:
        self.db = db
        self.settings = settings
        self.on_complete = on_complete
        self.metrics = metrics or NodeMetrics()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- triggers -------------------------------------------------------------------------

    def check_quiet(self) -> list[str]:
        """Complete every receiving study quiet for the quiet period.

        Returns
        -------
        list of str
            Study UIDs completed by this call.
        """
        cutoff = utcnow() - timedelta(seconds=self.settings.quiet_period_s)
        with self.db.session() as session:
            uids = list(session.execute(
                select(Study.study_uid).where(
                    Study.state == StudyState.RECEIVING.value, Study.last_received_at <= cutoff
                )
            ).scalars())
        return [uid for uid in uids if self._complete(uid, QUIET_PERIOD, require_quiet=cutoff)]

    def on_association_released(self, study_uids: Iterable[str]) -> list[str]:
        """Check the studies an association carried, now that it is released.

        Parameters
        ----------
        study_uids : iterable of str
            Studies that received at least one instance over the association.

        Returns
        -------
        list of str
            Study UIDs completed by this call.
        """
        done = []
        for uid in set(study_uids):
            trigger = self._ready_trigger(uid)
            if trigger and self._complete(uid, trigger):
                done.append(uid)
        return done

    def _ready_trigger(self, study_uid: str) -> str | None:
        with self.db.session() as session:
            study = _receiving_study(session, study_uid)
            if study is None:
                return None
            by_series = _image_series(session, study)
        if not by_series:
            return None
        if self.settings.expected_count:
            expected = [
                (len(insts), {i.images_in_acquisition for i in insts})
                for insts in by_series.values()
            ]
            if all(len(e) == 1 and None not in e and n >= next(iter(e))  # type: ignore[operator]
                   for n, e in expected):
                return EXPECTED_COUNT
        if self.settings.on_association_release:
            problems = {
                uid: contiguity_problem(
                    SeriesGeometry(uid, frozenset(i.orientation for i in insts),
                                   tuple(i.slice_position for i in insts  # type: ignore[misc]
                                         if i.slice_position is not None)),
                    self.settings.min_slices,
                )
                for uid, insts in by_series.items()
            }
            if not any(problems.values()):
                return ASSOCIATION_RELEASE
            log.info("study.not_contiguous", extra=fields(
                study=study_uid, problems="; ".join(p for p in problems.values() if p)))
        return None

    def _complete(self, study_uid: str, trigger: str, require_quiet: object = None) -> bool:
        with self.db.transaction() as session:
            study = _receiving_study(session, study_uid)
            if study is None:
                return False
            if require_quiet is not None and study.last_received_at > require_quiet:  # type: ignore[operator]
                return False
            study.state = StudyState.COMPLETE.value
            study.completion_trigger = trigger
            study.completed_at = utcnow()
            session.add(Job(study=study, study_version=study.version, pipeline=None,
                            priority=ROUTING_PRIORITY, attempts=0))
            session.add(AuditEvent(
                event="study.complete", study_uid=study_uid, calling_aet=study.calling_aet,
                detail={"trigger": trigger, "version": study.version,
                        "instances": study.instance_count},
            ))
            version, count = study.version, study.instance_count
        self.metrics.studies_completed.labels(trigger).inc()
        log.info("study.complete", extra=fields(
            study=study_uid, trigger=trigger, version=version, instances=count))
        if self.on_complete is not None:
            self.on_complete(study_uid)
        return True

    # --- thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the quiet-period poller."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the poller and wait for it."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            try:
                self.check_quiet()
            except Exception:
                log.exception("completion.poll_failed")


def _receiving_study(session: Session, study_uid: str) -> Study | None:
    """The study if it is still receiving (else None: unknown, complete or processed)."""
    study = session.execute(
        select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
    return study if study is not None and study.state == StudyState.RECEIVING.value else None


def study_instances(session: Session, study_uid: str, version: int) -> Sequence[Instance]:
    """Every instance that belongs to ``version`` of a study (what a job processes).

    Parameters
    ----------
    session : sqlalchemy.orm.Session
    study_uid : str
    version : int

    Returns
    -------
    list of Instance
    """
    return list(session.execute(
        select(Instance)
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .where(Study.study_uid == study_uid, Instance.study_version <= version)
        .order_by(Series.id, Instance.slice_position, Instance.instance_number)
    ).scalars())
