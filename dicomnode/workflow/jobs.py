"""Jobs: a completed study version is routed, each routed pipeline runs as its own job.

Two kinds of job rows, both claimed by the same workers, highest priority first:

- a *routing* job (``pipeline`` is NULL), queued when a study completes: it reads the
  study's headers, picks series, detects the body region, applies the routing rules
  and queues one pipeline job per action with the action's priority (an ICH study is
  ``urgent`` and overtakes a queue of liver studies);
- a *pipeline* job: loads the chosen series, runs the pipeline, writes the result
  objects and queues them in the outbox for each destination.

Two lanes of worker threads (:class:`JobRunner`):

- ``workers`` threads take any job, highest priority first, so a queued urgent study
  is the next one any of them starts;
- ``urgent_workers`` threads (the urgent lane) take only jobs of at least
  :data:`URGENT_LANE_MIN_PRIORITY`: routing jobs and urgent pipeline jobs. While every
  other worker runs a long job, an urgent study is routed and started at once instead
  of waiting for one of them to finish. A running job is never interrupted: stopping a
  model half-way through a volume on the GPU throws away its work and leaves the device
  in an uncertain state, and an idle thread costs nothing.

Both lanes share one process, so one copy of each pipeline's weights and one device:
two networks may run on it at once. Each pipeline checks host memory before it starts
(``ModelPipeline.unusable``) and turns an out-of-memory error into "no result"; a job
that ran short of memory while another job was running here is run once more when no
other job is running (see :meth:`JobRunner.run_one`), so sharing the device alone does
not cost a study its result, only time.

``process_study`` does both in one call without a database, for ``dicomnode process``.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from dicomnode.config import Settings
from dicomnode.logs import fields
from dicomnode.metrics import NodeMetrics
from dicomnode.pipelines.base import (
    PipelineContext,
    PipelineUnavailableError,
    availability,
    get_pipeline,
)
from dicomnode.store.db import Database
from dicomnode.store.files import job_files
from dicomnode.store.models import AuditEvent, Instance, Job, JobState, Series, Study, utcnow
from dicomnode.workflow.completion import ROUTING_PRIORITY, study_instances
from dicomnode.workflow.export import Outbox, resolve_targets
from dicomnode.workflow.notify import Notifier, notifications_for, record_queued
from dicomnode.workflow.routing import RoutingRules, load_rules, route_study

if TYPE_CHECKING:  # highdicom is imported off the start path
    from dicomnode.workflow.emit import SegWriter

log = logging.getLogger(__name__)

#: Queue order of job rows: routing is quick and goes before every pipeline job but an
#: urgent one.
PRIORITY = {"routing": ROUTING_PRIORITY, "urgent": 100, "high": 70, "normal": 50, "low": 10}


def _take(job: Job, worker: str) -> dict[str, Any]:
    """Mark a locked job row as running on ``worker``; what running it needs."""
    job.state = JobState.RUNNING.value
    job.started_at = utcnow()
    job.attempts += 1
    job.worker = worker
    study = job.study
    return {"id": job.id, "study_uid": study.study_uid, "version": job.study_version,
            "calling_aet": study.calling_aet, "pipeline": job.pipeline,
            "priority": job.priority, "routing": job.routing or {}, "attempt": job.attempts}


def lower_thread_priority(increment: int) -> int | None:
    """Make the calling thread ``increment`` nice levels nicer; returns its new level.

    Linux keeps a nice level per thread, and threads inherit it from the thread that
    starts them: torch's OpenMP pool, started by the job worker on its first network
    call, runs at the worker's level. The listener's threads keep theirs, so receiving
    goes first when the models and the senders want the same cores. None where the
    platform has no per-thread priority or refuses.
    """
    if increment <= 0 or not hasattr(os, "setpriority"):
        return None
    tid = threading.get_native_id()
    try:
        level = min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment)
        os.setpriority(os.PRIO_PROCESS, tid, level)
    except OSError as exc:
        log.warning("jobs.nice_failed", extra=fields(error=str(exc)))
        return None
    return level


def priority_name(value: int) -> str:
    """The name of a job priority (``"urgent"``), or the number when it has none."""
    return next((name for name, v in PRIORITY.items() if v == value), str(value))


#: The lowest priority the urgent lane takes: routing jobs (a study is not known to be
#: urgent before it is routed, and routing takes about a second) and urgent jobs.
URGENT_LANE_MIN_PRIORITY = min(PRIORITY["routing"], PRIORITY["urgent"])

#: Reasons of a run that lacked memory (``ModelPipeline.run`` and ``unusable``); one
#: such run while another job was running is tried again alone.
_SHORT_OF_MEMORY = ("out of memory", "volume too large")


#: Routed volumes kept in memory for the pipeline jobs that follow (each ~2 bytes/voxel).
_VOLUMES_KEPT = 2


@dataclass
class StudyRun:
    """What processing one study (or one pipeline on it) produced.

    Attributes
    ----------
    state : JobState
        ``done`` with result files, ``no_result`` with a reason, ``failed`` on a bug.
    reason : str
        Why there is no result (empty when done).
    pipeline : str or None
        The pipeline that ran (None for routing).
    routing : dict
        The routing decision, JSON-serialisable.
    result_files : list of Path
        DICOM files to deliver.
    timings : dict
        Seconds per stage.
    summary : dict
        Extra JSON-serialisable facts for the job record.
    """

    state: JobState
    reason: str = ""
    pipeline: str | None = None
    routing: dict[str, Any] = field(default_factory=dict)
    result_files: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (what ``dicomnode process`` prints)."""
        return {
            "state": self.state.value,
            "reason": self.reason,
            "pipeline": self.pipeline,
            "routing": self.routing,
            "result_files": [str(p) for p in self.result_files],
            "timings": self.timings,
            **self.summary,
        }


def run_pipeline(name: str, volume: Any, out_dir: Path, *, version: int = 1,
                 seg_writer: SegWriter | None = None,
                 no_result_report: bool = False,
                 context: PipelineContext | None = None,
                 radiomics: Any = None, burned_in_series: bool = False) -> StudyRun:
    """Run one pipeline on a loaded volume and write its result objects.

    Parameters
    ----------
    name : str
        Registry name of the pipeline.
    volume : imaging.series.Volume
        The series chosen for it.
    out_dir : Path
        Where the result ``.dcm`` files go.
    version : int
        Study version (shown in the result series descriptions).
    seg_writer : dicomnode.workflow.emit.SegWriter, optional
        A started helper process that writes the SEG beside the other objects.
    no_result_report : bool
        When the pipeline ran and has no result, write an SR saying why (its file is
        the run's result file).
    context : PipelineContext, optional
        The node's models folder and device (default: from the environment).
    radiomics : dicomnode.results.radiomics.RadiomicsParameters, optional
        When given, the IBSI features of each segmented structure are computed and
        reported (``measurements["radiomics"]`` of the result, and in its SR).
    burned_in_series : bool
        Also write the burned-in Secondary Capture series (``results.burned_in_series``).

    Returns
    -------
    StudyRun
        ``no_result`` with the reason when the pipeline is unavailable or found nothing
        it may report; never raises for bad data.
    """
    from dicomnode.workflow.emit import write_no_result_report, write_result_objects

    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        pipeline = get_pipeline(name, context)
    except PipelineUnavailableError as exc:
        return StudyRun(JobState.NO_RESULT, reason=str(exc), pipeline=name)
    timings["load_model"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    result = pipeline.run(volume)
    timings["inference"] = round(time.perf_counter() - started, 3)
    timings.update({f"pipeline.{k}": v for k, v in result.timings.items()})
    if radiomics is not None and result.ok and result.label_map is not None:
        from dicomnode.results.radiomics import compute_radiomics

        started = time.perf_counter()
        result.measurements["radiomics"] = compute_radiomics(
            volume.hu, result.label_map, result.structures, volume.spacing,
            radiomics).to_dict()
        timings["radiomics"] = round(time.perf_counter() - started, 3)
    summary = {"result": result.summary()}
    if not result.ok:
        files = []
        if no_result_report and result.algorithm:
            started = time.perf_counter()
            files.append(write_no_result_report(result, volume, out_dir, version=version))
            timings["encode"] = round(time.perf_counter() - started, 3)
        return StudyRun(JobState.NO_RESULT, reason=result.reason, pipeline=name,
                        result_files=files, timings=timings, summary=summary)
    started = time.perf_counter()
    files = write_result_objects(result, volume, out_dir, pipeline.emits, version=version,
                                 seg_writer=seg_writer, burned_in_series=burned_in_series)
    timings["encode"] = round(time.perf_counter() - started, 3)
    return StudyRun(JobState.DONE, pipeline=name, result_files=files, timings=timings,
                    summary=summary)


def process_study(files: Sequence[Path], out_dir: Path, calling_aet: str = "",
                  pipeline: str | None = None, rules: RoutingRules | None = None,
                  context: PipelineContext | None = None,
                  radiomics: Any = None) -> StudyRun:
    """Route a study and run every routed pipeline, writing results to ``out_dir``.

    Parameters
    ----------
    files : sequence of Path
        Every instance file of the study (one version).
    out_dir : Path
        Where result ``.dcm`` files are written (one folder per pipeline).
    calling_aet : str
        The sender, which routing rules may match on.
    pipeline : str, optional
        Run this pipeline on the series routing picked, whatever the rules say.
    rules : RoutingRules, optional
        Routing rules; default the embedded ones.
    context : PipelineContext, optional
        Models folder and device (default: from the environment).
    radiomics : dicomnode.config.RadiomicsSettings, optional
        Which pipelines' structures get IBSI features, and how (default: none).

    Returns
    -------
    StudyRun
        ``done`` when at least one pipeline produced results.
    """
    from dicomnode.imaging.selection import describe_study
    from dicomnode.imaging.series import load_series

    started = time.perf_counter()
    infos = describe_study([Path(f) for f in files])  # headers read once, for both uses
    decision = route_study([], rules or load_rules(), calling_aet or None, infos=infos)
    timings = {"route": round(time.perf_counter() - started, 3)}
    routing = decision.to_dict()
    names = [a.pipeline for a in decision.actions]
    if pipeline is not None:
        if decision.volume is None:
            return StudyRun(JobState.NO_RESULT, reason=decision.reason or "no usable series",
                            pipeline=pipeline, routing=routing, timings=timings)
        names = [pipeline]
    elif not decision.routed:
        return StudyRun(JobState.NO_RESULT, reason=decision.reason, routing=routing,
                        timings=timings)
    runs = []
    for name in names:
        action = next((a for a in decision.actions if a.pipeline == name), None)
        volume = decision.volume
        if action is not None and action.series_instance_uid != decision.series_instance_uid:
            info = next(i for i in infos if i.series_instance_uid == action.series_instance_uid)
            volume = load_series(info.paths or info.headers)
        run = run_pipeline(name, volume, out_dir / name, context=context,
                           radiomics=radiomics.for_pipeline(name) if radiomics else None)
        runs.append(run)
        timings.update({f"{name}.{k}": v for k, v in run.timings.items()})
    done = [r for r in runs if r.state == JobState.DONE]
    return StudyRun(
        JobState.DONE if done else JobState.NO_RESULT,
        reason="; ".join(f"{r.pipeline}: {r.reason}" for r in runs if r.reason),
        pipeline=",".join(names),
        routing=routing,
        result_files=[f for r in done for f in r.result_files],
        timings=timings,
        summary={"pipelines": {r.pipeline: {"state": r.state.value, "reason": r.reason,
                                            **r.summary} for r in runs}},
    )


class JobRunner:
    """Embedded worker threads that run queued jobs.

    Parameters
    ----------
    db : Database
        Jobs and the instance index.
    settings : Settings
        Spool location, worker count, routing rules, export targets.
    outbox : Outbox
        Where results are queued.
    notifier : Notifier, optional
        Woken when a job queued urgent notifications (rows are queued without it, and
        a notifier in another process finds them).
    metrics : NodeMetrics, optional
        Where job states and stage latencies are recorded (default: a registry of its own).
    """

    def __init__(self, db: Database, settings: Settings, outbox: Outbox,
                 notifier: Notifier | None = None, metrics: NodeMetrics | None = None,
                 ) -> None:
        self.db = db
        self.settings = settings
        self.outbox = outbox
        self.notifier = notifier
        self.metrics = metrics or NodeMetrics()
        self.rules = load_rules(settings.routing_rules)
        #: The models folder and device the node's settings give its pipelines.
        self.context = PipelineContext.from_settings(settings)
        self._stop = threading.Event()
        # one wake-up per worker thread: a thread that clears its own cannot swallow
        # another's (the urgent lane must not sleep through an urgent job's arrival)
        self._wakes: list[threading.Event] = []
        self._threads: list[threading.Thread] = []
        # jobs running in this process, and how many have started, for memory retries
        self._running = 0
        self._started = 0
        self._running_changed = threading.Condition()
        #: Set once the start-up check and warm-up are over (done, skipped or failed).
        self.warmed = threading.Event()
        # the volume routing just built, for the pipeline jobs of the same series and
        # study version in this process (another process loads it again)
        self._volumes: OrderedDict[tuple[str, int, str], Any] = OrderedDict()
        self._volumes_lock = threading.Lock()
        # the start-up check's verdict per pipeline, for the workers to warm on their own
        # threads, and one event per worker set once it has (or will not)
        self._states: dict[str, str] = {}
        self._checked = threading.Event()
        self._workers_warm: list[threading.Event] = []
        self._froze_gc = False
        #: The DICOM-SEG helper process (``settings.seg_writer_process``), once started.
        self.seg_writer: SegWriter | None = None
        #: Where jobs read instances and write results (``store/files.py``).
        self.files = job_files(settings)

    def _keep_volume(self, key: tuple[str, int, str], volume: Any) -> None:
        with self._volumes_lock:
            self._volumes[key] = volume
            self._volumes.move_to_end(key)
            while len(self._volumes) > _VOLUMES_KEPT:
                self._volumes.popitem(last=False)

    def _kept_volume(self, key: tuple[str, int, str]) -> Any:
        with self._volumes_lock:
            return self._volumes.get(key)

    def wake(self) -> None:
        """Look for work now (called when a study completes)."""
        for event in self._wakes:
            event.set()

    def _claim(self, worker: str, min_priority: int | None = None) -> dict[str, Any] | None:
        query = select(Job).where(Job.state == JobState.QUEUED.value)
        if min_priority is not None:
            query = query.where(Job.priority >= min_priority)
        with self.db.transaction() as session:
            job = session.execute(
                query.order_by(Job.priority.desc(), Job.created_at, Job.id).limit(1)
                # PostgreSQL: a row another process is claiming is skipped, not waited
                # for and claimed twice (SQLite has one writer and ignores this)
                .with_for_update(skip_locked=True, of=Job)
            ).scalar_one_or_none()
            if job is None:
                return None
            return _take(job, worker)

    def claim_job(self, job_id: int, worker: str, takeover: bool = False,
                  ) -> dict[str, Any] | None:
        """Claim the job ``job_id`` if it is queued; None if it is not (any more).

        A task queue may deliver a job twice (the node published it again, the broker
        redelivered it): only the first delivery finds it queued, the others do nothing.
        With ``takeover`` (the broker delivered the task again because the worker that
        held it died) a *running* job is claimed too; the dead worker's attempt can no
        longer finish it (see ``_finish``). A job taken over ``celery.max_attempts`` times
        is recorded as failed instead.

        Parameters
        ----------
        job_id : int
            The job row.
        worker : str
            Recorded as the worker that runs it.
        takeover : bool
            Also claim it when it is running.

        Returns
        -------
        dict or None
            The claimed job, as ``run_one`` runs it.
        """
        states = {JobState.QUEUED.value} | ({JobState.RUNNING.value} if takeover else set())
        with self.db.transaction() as session:
            job = session.execute(
                select(Job).where(Job.id == job_id).with_for_update(of=Job)
            ).scalar_one_or_none()
            if job is None or job.state not in states:
                return None
            if job.state == JobState.RUNNING.value:
                log.warning("job.taken_over", extra=fields(job=job.id, previous=job.worker,
                                                           attempts=job.attempts))
                if job.attempts >= self.settings.celery.max_attempts:
                    job.state = JobState.FAILED.value
                    job.reason = (f"its worker stopped during each of {job.attempts} "
                                  "attempts")
                    job.finished_at = utcnow()
                    return None
            return _take(job, worker)

    def run_one(self, worker: str = "inline", min_priority: int | None = None) -> bool:
        """Claim and run one queued job; returns False when none was queued.

        Parameters
        ----------
        worker : str
            Recorded in the job row as the worker that ran it.
        min_priority : int, optional
            Take only jobs of at least this priority (the urgent lane:
            :data:`URGENT_LANE_MIN_PRIORITY`); default any job.

        Returns
        -------
        bool
            Whether a job was claimed (and run).

        Notes
        -----
        A pipeline job that ends short of memory ("out of memory", "volume too large")
        while another job was running in this process waits until none is, then runs
        once more: both lanes share the host memory and the GPU, and each pipeline's
        memory check sees only what is free when it starts.
        """
        job = self._claim(worker, min_priority)
        if job is None:
            return False
        self._run_claimed(job, worker)
        return True

    def run_job(self, job_id: int, worker: str, takeover: bool = False) -> bool:
        """Claim the job ``job_id`` (see ``claim_job``) and run it; False if not claimed."""
        job = self.claim_job(job_id, worker, takeover)
        if job is None:
            log.info("job.not_claimed", extra=fields(job=job_id, worker=worker))
            return False
        self._run_claimed(job, worker)
        return True

    def _run_claimed(self, job: dict[str, Any], worker: str) -> None:
        log.info("job.started", extra=fields(job=job["id"], study=job["study_uid"],
                                             version=job["version"],
                                             pipeline=job["pipeline"] or "routing",
                                             priority=job["priority"], worker=worker))
        with self._running_changed:
            self._running += 1
            self._started += 1
        try:
            run = self._route(job) if job["pipeline"] is None else self._pipeline(job)
        except Exception as exc:  # a bug must not stop the worker; the reason is recorded
            log.exception("job.crashed", extra=fields(job=job["id"]))
            run = StudyRun(JobState.FAILED, reason=f"{type(exc).__name__}: {exc}",
                           pipeline=job["pipeline"], routing=job["routing"])
        finally:
            with self._running_changed:
                self._running -= 1
                self._running_changed.notify_all()
        self._finish(job, run)

    def _shared(self, started_before: int) -> bool:
        """Whether another job ran beside this one since ``started_before`` was read."""
        with self._running_changed:
            return self._running > 1 or self._started != started_before

    def _wait_alone(self, timeout: float = 3600.0) -> None:
        """Wait until no other job runs in this process (this one not counted)."""
        with self._running_changed:
            self._running -= 1
            try:
                self._running_changed.wait_for(
                    lambda: self._running == 0 or self._stop.is_set(), timeout)
            finally:
                self._running += 1

    def _files(self, study_uid: str, version: int, series_uid: str | None = None) -> list[Path]:
        with self.db.session() as session:
            if series_uid is None:
                rows = study_instances(session, study_uid, version)
            else:
                rows = list(session.execute(
                    select(Instance).join(Series, Instance.series_pk == Series.id)
                    .where(Series.series_uid == series_uid, Instance.study_version <= version)
                ).scalars())
        return [self.files.instance_path(row.path) for row in rows]

    def _route(self, job: dict[str, Any]) -> StudyRun:
        started = time.perf_counter()
        files = self._files(job["study_uid"], job["version"])
        decision = route_study(files, self.rules, job["calling_aet"] or None)
        if decision.volume is not None and decision.series_instance_uid:
            self._keep_volume((job["study_uid"], job["version"], decision.series_instance_uid),
                              decision.volume)
        routing = decision.to_dict()
        timings = {"route": round(time.perf_counter() - started, 3)}
        if not decision.routed:
            return StudyRun(JobState.NO_RESULT, reason=decision.reason, routing=routing,
                            timings=timings)
        with self.db.transaction() as session:
            study = session.execute(
                select(Study).where(Study.study_uid == job["study_uid"])).scalar_one()
            if self._routed_before(session, job, study.id):
                return StudyRun(JobState.DONE, reason="routed by an earlier attempt",
                                routing=routing, timings=timings)
            for action in decision.actions:
                session.add(Job(
                    study=study, study_version=job["version"], pipeline=action.pipeline,
                    priority=PRIORITY.get(action.priority, PRIORITY["normal"]), attempts=0,
                    routing={**routing, "action": action.to_dict()},
                ))
        self.wake()
        names = ", ".join(f"{a.pipeline} ({a.priority})" for a in decision.actions)
        return StudyRun(JobState.DONE, reason=f"routed to {names}", routing=routing,
                        timings=timings)

    @staticmethod
    def _routed_before(session: Any, job: dict[str, Any], study_pk: int) -> bool:
        """Whether this routing attempt must not queue pipeline jobs: another worker took
        the routing job over, or an attempt that died after queueing them did so already
        (one set of pipeline jobs, hence of results, per study version)."""
        row = session.execute(
            select(Job).where(Job.id == job["id"]).with_for_update(of=Job)).scalar_one()
        if row.state != JobState.RUNNING.value or row.attempts != job["attempt"]:
            return True
        return session.execute(select(Job.id).where(
            Job.study_pk == study_pk, Job.study_version == job["version"],
            Job.pipeline.is_not(None)).limit(1)).first() is not None

    def _pipeline(self, job: dict[str, Any]) -> StudyRun:
        from dicomnode.imaging.series import load_series

        action = job["routing"].get("action", {})
        started = time.perf_counter()
        series_uid = action.get("series_instance_uid")
        files = self._files(job["study_uid"], job["version"], series_uid)
        if not files:
            return StudyRun(JobState.NO_RESULT, reason="the routed series has no instances",
                            pipeline=job["pipeline"], routing=job["routing"])
        volume = self._kept_volume((job["study_uid"], job["version"], series_uid or ""))
        source = "kept from routing"
        if volume is None or len(volume.sop_instance_uids) != len(files):
            volume, source = load_series(files), "loaded"
        load_s = round(time.perf_counter() - started, 3)
        out_dir = self.files.results_dir(job["id"])
        with self._running_changed:
            started_before = self._started
        run = run_pipeline(job["pipeline"], volume, out_dir, version=job["version"],
                           seg_writer=self.seg_writer,
                           no_result_report=self.settings.no_result_report,
                           context=self.context,
                           radiomics=self.settings.radiomics.for_pipeline(job["pipeline"]),
                           burned_in_series=self.settings.results.burned_in_series)
        if (run.state == JobState.NO_RESULT and run.reason.startswith(_SHORT_OF_MEMORY)
                and self._shared(started_before)):
            log.info("job.retry_alone", extra=fields(job=job["id"], reason=run.reason))
            self._wait_alone()
            run = run_pipeline(job["pipeline"], volume, out_dir, version=job["version"],
                               seg_writer=self.seg_writer,
                               no_result_report=self.settings.no_result_report,
                               context=self.context,
                               radiomics=self.settings.radiomics.for_pipeline(job["pipeline"]),
                               burned_in_series=self.settings.results.burned_in_series)
        run.result_files = self.files.publish_results(run.result_files)
        run.timings = {"load_series": load_s, **run.timings}
        run.summary = {**(run.summary or {}), "volume": source}
        flagged = (run.summary.get("result") or {}).get("flagged_slices") or []
        if flagged:  # the key images by UID, for the urgent notification
            run.summary["flagged_sop_instance_uids"] = [
                str(volume.sop_instance_uids[i]) for i in flagged]
        run.routing = job["routing"]
        return run

    def _finish(self, job: dict[str, Any], run: StudyRun) -> None:
        deliveries: list[int] = []
        with self.db.transaction() as session:
            row = session.execute(
                select(Job).where(Job.id == job["id"]).with_for_update(of=Job)
            ).scalar_one()
            if row.state != JobState.RUNNING.value or row.attempts != job["attempt"]:
                # another worker took the job over (this one was thought dead): its
                # attempt alone may send results, never both
                log.warning("job.result_dropped", extra=fields(
                    job=job["id"], state=row.state, attempts=row.attempts))
                return
            # results, or the report that there are none (no_result_report), queued in
            # the transaction that records the job as finished
            if run.result_files:
                names = run.routing.get("action", {}).get("destinations")
                for target in resolve_targets(self.settings, job["calling_aet"],
                                              run.pipeline, names):
                    deliveries.append(self.outbox.enqueue(
                        run.result_files, target, study_uid=job["study_uid"],
                        job_pk=job["id"], session=session))
            study = session.execute(
                select(Study).where(Study.study_uid == job["study_uid"])).scalar_one()
            row.state = run.state.value
            row.reason = run.reason or None
            row.routing = run.routing or None
            row.timings = run.timings
            row.result = {**run.summary, "files": [str(p) for p in run.result_files],
                          "deliveries": deliveries,
                          "superseded_by_version":
                          study.version if study.version != job["version"] else None}
            row.finished_at = utcnow()
            seconds = ((row.finished_at - row.started_at).total_seconds()
                       if row.started_at is not None else None)
            session.add(AuditEvent(event=f"job.{run.state.value}", study_uid=job["study_uid"],
                                   calling_aet=job["calling_aet"],
                                   detail={"job": job["id"], "pipeline": run.pipeline,
                                           "reason": run.reason}))
            # the urgent alarm is recorded with the result it reports (sent by the notifier)
            notifications = [] if run.state != JobState.DONE else notifications_for(
                self.settings, study_uid=job["study_uid"], study_version=job["version"],
                accession_number=study.accession_number, calling_aet=job["calling_aet"],
                pipeline=run.pipeline, priority=priority_name(job["priority"]),
                urgent=job["priority"] >= PRIORITY["urgent"], job_id=job["id"],
                summary=run.summary, result_files=run.result_files,
                series_instance_uid=str(run.routing.get("action", {}).get(
                    "series_instance_uid") or ""))
            if notifications:
                session.add_all(notifications)
                session.flush()
                record_queued(session, notifications)
                row.result = {**row.result, "notifications": [n.id for n in notifications]}
        if deliveries:
            self.outbox.wake()
        if notifications and self.notifier is not None:
            self.notifier.wake()
        self.metrics.job_finished(run.pipeline if job["pipeline"] else None, run.state.value,
                                  run.timings, seconds)
        log.info("job.finished", extra=fields(job=job["id"], state=run.state.value,
                                              pipeline=run.pipeline or "routing",
                                              reason=run.reason, deliveries=len(deliveries)))

    def check_pipelines(self) -> dict[str, str]:
        """Check every installed pipeline (weights present and intact), log and record it.

        An unavailable pipeline is logged as a warning with its reason and recorded as a
        ``pipelines.checked`` audit event that ``dicomnode status`` shows; the node keeps
        receiving, and studies routed to it end as ``no_result`` with the same reason.

        Returns
        -------
        dict
            Pipeline name -> ``"ok"`` or the reason it cannot run.
        """
        states = availability(self.context)
        for name, state in states.items():
            if state == "ok":
                log.info("pipeline.available", extra=fields(pipeline=name))
            else:
                log.warning("pipeline.unavailable", extra=fields(pipeline=name, reason=state))
        with self.db.transaction() as session:
            session.add(AuditEvent(event="pipelines.checked", detail=states))
        return states

    def _check_in_background(self) -> None:
        try:
            seg_writer_warm = self._start_seg_writer()
            self._check_and_warm()
            if seg_writer_warm is not None and self.settings.warm_up:
                seg_writer_warm.exception(timeout=300)  # ready (or dropped) before warmed
        except Exception:
            log.exception("seg_writer.start_failed")
        finally:
            self._checked.set()
            for event in self._workers_warm:
                event.wait(300)
            if self.settings.warm_up and not self._stop.is_set():
                self._freeze_start_up_objects()
            self.warmed.set()

    def _freeze_start_up_objects(self) -> None:
        """Leave everything loaded at start-up out of the garbage collector's full passes.

        torch, highdicom, SQLAlchemy, pynetdicom and the warmed pipelines are ~400 000
        objects that live as long as the process; each full collection walked them all,
        and parsing a study's headers triggers several (routing a 512x512x300 study on the
        2-core build machine: median 1.47 s with them, 1.15 s frozen, and steadier). Objects
        are still freed by reference counting; ``stop`` unfreezes them.
        """
        gc.collect()
        gc.freeze()
        self._froze_gc = True
        log.info("gc.frozen", extra=fields(objects=gc.get_freeze_count()))

    def _start_seg_writer(self) -> Future[float] | None:
        """Spawn the SEG helper process; returns its warm-up future (None: not wanted)."""
        if not self.settings.seg_writer_process or self._stop.is_set():
            return None
        from dicomnode.workflow.emit import SegWriter  # highdicom: off the start path

        writer = SegWriter()
        warm = writer.start()
        self.seg_writer = writer

        def ready(future: Future[float]) -> None:
            if future.exception() is None:
                log.info("seg_writer.warm", extra=fields(seconds=round(future.result(), 3)))
                return
            # a helper that cannot start (no process may be spawned here): every SEG is
            # written in the job's thread, as with seg_writer_process off
            log.warning("seg_writer.unavailable", extra=fields(
                reason=f"{type(future.exception()).__name__}: {future.exception()}"))
            if self.seg_writer is writer:
                self.seg_writer = None
            writer.stop(wait=False)

        warm.add_done_callback(ready)
        return warm

    def _check_and_warm(self) -> None:
        try:
            self._states = self.check_pipelines()
        except Exception:
            log.exception("pipeline.check_failed")
            return
        finally:
            self._checked.set()  # the workers warm the pipelines on their own threads
        if not self.settings.warm_up or self._stop.is_set():
            return
        from dicomnode.workflow.emit import warm_up_encoders  # highdicom: off the start path

        try:
            seconds = warm_up_encoders(self.settings.results_dir)
        except Exception:  # a study will meet the same problem and record it
            log.exception("results.warm_up_failed")
            return
        log.info("results.warm", extra=fields(seconds=round(seconds, 3)))

    def start(self) -> None:
        """Start the worker threads (and check the pipelines they run).

        ``settings.workers`` threads named ``worker-<pid>-<n>`` take any job;
        ``settings.urgent_workers`` threads named ``worker-<pid>-urgent-<n>`` take only
        routing and urgent jobs. With ``workers`` 0 no thread starts (jobs stay queued).
        """
        self._stop.clear()
        self._checked.clear()
        self.warmed.clear()
        lanes: list[tuple[str, int | None]] = []
        if self.settings.workers > 0:
            lanes = [(f"worker-{os.getpid()}-{n}", None) for n in range(self.settings.workers)]
            lanes += [(f"worker-{os.getpid()}-urgent-{n}", URGENT_LANE_MIN_PRIORITY)
                      for n in range(self.settings.urgent_workers)]
        if lanes:
            # weights are hashed, loaded and run once off the start-up path: the node
            # listens at once, says which pipeline is unavailable when it knows, and the
            # first study does not pay for loading weights or starting the GPU
            thread = threading.Thread(target=self._check_in_background,
                                      name="pipeline-check", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._workers_warm = [threading.Event() for _ in lanes]
        self._wakes = [threading.Event() for _ in lanes]
        for (name, min_priority), warm, wake in zip(lanes, self._workers_warm, self._wakes,
                                                     strict=True):
            thread = threading.Thread(target=self._run, args=(name, warm, wake, min_priority),
                                      name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the workers; a running job finishes first."""
        self._stop.set()
        self.wake()
        with self._running_changed:
            self._running_changed.notify_all()
        for thread in self._threads:
            thread.join(timeout=300)
        self._threads.clear()
        if self.seg_writer is not None:
            self.seg_writer.stop()
            self.seg_writer = None
        if self._froze_gc:
            gc.unfreeze()
            self._froze_gc = False

    def warm_here(self) -> None:
        """Check every pipeline, then warm the available ones on the calling thread.

        For a process that runs jobs on its own thread instead of the runner's (a Celery
        worker): the first job pays neither for loading weights nor for starting the GPU.
        """
        self._states = self.check_pipelines()
        self._checked.set()
        self._warm_pipelines()

    def _warm_pipelines(self) -> None:
        """Warm every available pipeline on this (worker) thread (see Pipeline.warm_up)."""
        self._checked.wait(300)
        for name, state in self._states.items():
            if state != "ok" or self._stop.is_set():
                continue
            started = time.perf_counter()
            try:
                get_pipeline(name, self.context).warm_up()
            except Exception:  # a study will report the same problem as no_result
                log.exception("pipeline.warm_up_failed", extra=fields(pipeline=name))
                continue
            log.info("pipeline.warm", extra=fields(
                pipeline=name, seconds=round(time.perf_counter() - started, 3),
                thread=threading.current_thread().name))

    def _run(self, name: str, warm: threading.Event, wake: threading.Event,
             min_priority: int | None) -> None:
        lower_thread_priority(self.settings.job_nice)
        try:
            if self.settings.warm_up:
                self._warm_pipelines()
        finally:
            warm.set()
        while not self._stop.is_set():
            wake.clear()  # before looking: a job queued after the look sets it again
            try:
                worked = self.run_one(name, min_priority)
            except Exception:
                log.exception("jobs.poll_failed")
                worked = False
            if not worked:
                wake.wait(1.0)
