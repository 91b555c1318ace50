"""Jobs: one completed study version, routed, processed, its results queued for export.

The embedded runner claims queued job rows (highest priority first) in worker
threads. ``process_study`` is the one place that turns a list of instance files into
result files; ``dicomnode process`` calls it offline, the runner calls it for each job.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicomnode.config import Settings
from dicomnode.logs import fields
from dicomnode.store.db import Database
from dicomnode.store.models import AuditEvent, Job, JobState, Study, utcnow
from dicomnode.workflow.completion import study_instances
from dicomnode.workflow.export import Outbox, resolve_targets

log = logging.getLogger(__name__)


@dataclass
class StudyRun:
    """What processing one study produced.

    Attributes
    ----------
    state : JobState
        ``done`` with result files, ``no_result`` with a reason.
    reason : str
        Why there is no result (empty when done).
    pipeline : str or None
        The pipeline that ran.
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


StudyProcessor = Callable[[Sequence[Path], Path, str], StudyRun]


def process_study(files: Sequence[Path], out_dir: Path, calling_aet: str = "",
                  pipeline: str | None = None) -> StudyRun:
    """Route a study and run its pipeline, writing result objects to ``out_dir``.

    Parameters
    ----------
    files : sequence of Path
        Every instance file of the study (one version).
    out_dir : Path
        Where result ``.dcm`` files are written.
    calling_aet : str
        The sender, which routing rules may match on.
    pipeline : str, optional
        Force this pipeline instead of routing.

    Returns
    -------
    StudyRun
    """
    started = time.perf_counter()
    readable = [f for f in files if Path(f).is_file()]
    timings = {"load": round(time.perf_counter() - started, 3)}
    if not readable:
        return StudyRun(JobState.NO_RESULT, reason="the study has no readable instance files",
                        timings=timings)
    # Routing and the pipelines are separate stages (workflow/routing.py, pipelines/);
    # until a pipeline is installed the study stops here with an honest reason.
    return StudyRun(
        JobState.NO_RESULT,
        reason="no pipeline is installed in this version of dicomnode",
        pipeline=pipeline,
        timings=timings,
        summary={"instances": len(readable)},
    )


class JobRunner:
    """Embedded worker threads that run queued jobs.

    Parameters
    ----------
    db : Database
        Jobs and the instance index.
    settings : Settings
        Spool location, worker count, export targets.
    outbox : Outbox
        Where results are queued.
    processor : callable, optional
        Replaces ``process_study`` (same signature without ``pipeline``).
    """

    def __init__(self, db: Database, settings: Settings, outbox: Outbox,
                 processor: StudyProcessor | None = None) -> None:
        self.db = db
        self.settings = settings
        self.outbox = outbox
        self.processor = processor or process_study
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def wake(self) -> None:
        """Look for work now (called when a study completes)."""
        self._wake.set()

    def _claim(self, worker: str) -> tuple[int, str, int, str] | None:
        with self.db.transaction() as session:
            job = session.execute(
                select(Job).where(Job.state == JobState.QUEUED.value)
                .order_by(Job.priority.desc(), Job.created_at, Job.id).limit(1)
            ).scalar_one_or_none()
            if job is None:
                return None
            job.state = JobState.RUNNING.value
            job.started_at = utcnow()
            job.attempts += 1
            job.worker = worker
            study = job.study
            return job.id, study.study_uid, job.study_version, study.calling_aet

    def run_one(self, worker: str = "inline") -> bool:
        """Claim and run one queued job; returns False when none was queued."""
        claimed = self._claim(worker)
        if claimed is None:
            return False
        job_id, study_uid, version, calling_aet = claimed
        log.info("job.started", extra=fields(job=job_id, study=study_uid, version=version))
        with self.db.session() as session:
            files = [self.settings.spool_dir / inst.path
                     for inst in study_instances(session, study_uid, version)]
        out_dir = self.settings.results_dir / f"job-{job_id}"
        try:
            run = self.processor(files, out_dir, calling_aet)
        except Exception as exc:  # a pipeline bug must not stop the worker
            log.exception("job.crashed", extra=fields(job=job_id))
            run = StudyRun(JobState.FAILED, reason=f"{type(exc).__name__}: {exc}")
        deliveries = []
        if run.state == JobState.DONE and run.result_files:
            for target in resolve_targets(self.settings, calling_aet, run.pipeline):
                deliveries.append(self.outbox.enqueue(run.result_files, target,
                                                      study_uid=study_uid, job_pk=job_id))
        with self.db.transaction() as session:
            job = session.get(Job, job_id)
            assert job is not None
            study = session.execute(
                select(Study).where(Study.study_uid == study_uid)).scalar_one()
            superseded = study.version != version
            job.state = run.state.value
            job.reason = run.reason or None
            job.pipeline = run.pipeline
            job.routing = run.routing or None
            job.timings = run.timings
            job.result = {**run.summary, "files": [str(p) for p in run.result_files],
                          "deliveries": deliveries, "superseded_by_version":
                          study.version if superseded else None}
            job.finished_at = utcnow()
            session.add(AuditEvent(event=f"job.{run.state.value}", study_uid=study_uid,
                                   calling_aet=calling_aet,
                                   detail={"job": job_id, "reason": run.reason}))
        log.info("job.finished", extra=fields(job=job_id, state=run.state.value,
                                              reason=run.reason, deliveries=len(deliveries)))
        return True

    def start(self) -> None:
        """Start ``settings.workers`` worker threads."""
        self._stop.clear()
        for n in range(self.settings.workers):
            name = f"worker-{os.getpid()}-{n}"
            thread = threading.Thread(target=self._run, args=(name,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the workers; a running job finishes first."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=300)
        self._threads.clear()

    def _run(self, name: str) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_one(name)
            except Exception:
                log.exception("jobs.poll_failed")
                worked = False
            if not worked:
                self._wake.wait(1.0)
                self._wake.clear()
