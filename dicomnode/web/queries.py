"""Reads for the dashboard and the REST API: studies, jobs, deliveries, health.

The pages and the API call the same functions, so what a page shows is what the API
answers. The queue, the totals and the pipelines' recorded check come from
``dicomnode status``'s own :func:`dicomnode.store.status.node_status`.
"""

from __future__ import annotations

import logging
import shutil
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from dicomnode.config import Settings
from dicomnode.pipelines.base import registered
from dicomnode.store.db import Database
from dicomnode.store.models import (
    AuditEvent,
    Delivery,
    Instance,
    Job,
    JobState,
    Notification,
    Series,
    Study,
    StudyState,
    utcnow,
)
from dicomnode.store.status import node_status
from dicomnode.web.schemas import (
    AuditOut,
    DeliveryOut,
    GpuOut,
    HealthOut,
    JobOut,
    MeasurementOut,
    NotificationOut,
    PatientOut,
    PipelineOut,
    QueueOut,
    ResultFileOut,
    ResultOut,
    RoutingOut,
    SeriesOut,
    StudyDetailOut,
    StudyOut,
    StudyPage,
)
from dicomnode.workflow.jobs import priority_name

if TYPE_CHECKING:
    from dicomnode.node import Node

log = logging.getLogger(__name__)

#: Job states that end a job.
FINISHED = (JobState.DONE.value, JobState.NO_RESULT.value, JobState.FAILED.value)


def _aware(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


def result_files(job: Job) -> list[ResultFileOut]:
    """The result objects a job wrote, with their download links (files gone: no size)."""
    out = []
    for name in (job.result or {}).get("files", []) or []:
        path = Path(name)
        size = path.stat().st_size if path.is_file() else None
        out.append(ResultFileOut(name=path.name, kind=path.stem, size=size,
                                 url=f"/api/v1/jobs/{job.id}/files/{path.name}"))
    return out


def _median_durations(session: Session) -> dict[str | None, float]:
    """Median seconds of the last finished jobs per pipeline (the progress yardstick)."""
    rows = session.execute(
        select(Job.pipeline, Job.started_at, Job.finished_at)
        .where(Job.state.in_(FINISHED), Job.started_at.is_not(None),
               Job.finished_at.is_not(None))
        .order_by(Job.id.desc()).limit(500)).all()
    durations: dict[str | None, list[float]] = defaultdict(list)
    for pipeline, started, finished in rows:
        if started is not None and finished is not None:
            durations[pipeline].append((finished - started).total_seconds())
    return {k: statistics.median(v) for k, v in durations.items() if v}


def job_out(job: Job, study_uid: str, medians: dict[str | None, float] | None = None
            ) -> JobOut:
    """One job as the API shows it, with its progress while it runs."""
    progress = None
    if job.state == JobState.RUNNING.value and job.started_at is not None and medians:
        typical = medians.get(job.pipeline)
        if typical:
            elapsed = (utcnow() - job.started_at).total_seconds()
            progress = round(min(0.99, max(0.0, elapsed / typical)), 2)
    timings = {k: float(v) for k, v in (job.timings or {}).items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    return JobOut(
        id=job.id, study_uid=study_uid, version=job.study_version, pipeline=job.pipeline,
        state=job.state, priority=job.priority, priority_name=priority_name(job.priority),
        attempts=job.attempts, reason=job.reason, worker=job.worker, timings=timings,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        progress=progress, files=result_files(job))


def delivery_out(d: Delivery) -> DeliveryOut:
    """One outbox entry as the API shows it."""
    return DeliveryOut(
        id=d.id, job=d.job_pk, study_uid=d.study_uid,
        destination=f"{d.destination_ae}@{d.host}:{d.port}", files=len(d.files or []),
        state=d.state, attempts=d.attempts, last_error=d.last_error,
        next_attempt_at=d.next_attempt_at, sent_at=d.sent_at)


def _where(url: str) -> str:
    """Scheme and host of a URL: a webhook's path or query may hold a token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "") \
        if parts.scheme and parts.hostname else "(not a URL)"


def notification_out(n: Notification) -> NotificationOut:
    """One notification as the API shows it (the webhook's scheme and host only)."""
    return NotificationOut(
        id=n.id, job=n.job_pk, study_uid=n.study_uid, channel=n.channel,
        target=_where(n.target), state=n.state, attempts=n.attempts,
        last_error=n.last_error, created_at=n.created_at, sent_at=n.sent_at)


def routing_out(routing: dict[str, Any] | None, pipelines: Iterable[str]) -> RoutingOut:
    """The short form of a routing decision (``RoutingDecision.to_dict``)."""
    if not routing:
        return RoutingOut(pipelines=sorted(set(pipelines)))
    region = routing.get("region") or {}
    series = routing.get("series") or {}
    actions = [a.get("pipeline") for a in routing.get("actions") or [] if a.get("pipeline")]
    return RoutingOut(
        routed=routing.get("routed"), reason=routing.get("reason"),
        region=region.get("used"), region_source=region.get("source"),
        rule=routing.get("matched_rule"), reasons=list(routing.get("reasons") or []),
        series_instance_uid=series.get("series_instance_uid"), series_why=series.get("why"),
        pipelines=sorted(set(actions) | set(pipelines)))


def study_status(study: Study, jobs: Sequence[Job]) -> str:
    """One word for where a study stands (see ``StudyOut.status``).

    The latest job of each pipeline (and of routing) of the study's current version
    decides: anything running or queued first, then failed, done, no result.
    """
    if study.state == StudyState.RECEIVING.value:
        return "receiving"
    latest: dict[str | None, Job] = {}
    withdrawn = (JobState.CANCELLED.value, JobState.SUPERSEDED.value)
    for job in sorted(jobs, key=lambda j: j.id):
        # a cancelled re-run leaves the earlier run of that pipeline standing
        if job.study_version == study.version and (
                job.state not in withdrawn or job.pipeline not in latest):
            latest[job.pipeline] = job
    states = {j.state for j in latest.values()}
    if JobState.RUNNING.value in states:
        return "running"
    if JobState.QUEUED.value in states:
        queued_routing = latest.get(None) is not None and \
            latest[None].state == JobState.QUEUED.value
        return "routing" if queued_routing else "queued"
    pipeline_states = {j.state for p, j in latest.items() if p is not None}
    for state in (JobState.FAILED.value, JobState.DONE.value, JobState.NO_RESULT.value):
        if state in pipeline_states:
            return state
    routing = latest.get(None)
    if routing is not None and routing.state == JobState.FAILED.value:
        return "failed"
    if routing is not None and routing.state == JobState.NO_RESULT.value:
        return "not_routed"
    if states and states <= set(withdrawn):
        return "cancelled"
    return study.state


def _study_out(study: Study, jobs: Sequence[Job], deliveries: Sequence[Delivery],
               notifications: Sequence[Notification], series_count: int,
               medians: dict[str | None, float], cls: type[StudyOut] = StudyOut,
               **extra: Any) -> Any:
    current = [j for j in jobs if j.study_version == study.version]
    routing_job = next((j for j in sorted(current, key=lambda j: -j.id) if j.pipeline is None),
                       None)
    pipelines = [j.pipeline for j in current if j.pipeline]
    routing = routing_job.routing if routing_job is not None else None
    if routing is None:  # a re-routed or re-run job carries the decision too
        routing = next((j.routing for j in current if j.routing), None)
    return cls(
        study_uid=study.study_uid, accession_number=study.accession_number,
        study_date=study.study_date, calling_aet=study.calling_aet, state=study.state,
        status=study_status(study, jobs), version=study.version,
        completion_trigger=study.completion_trigger, instances=study.instance_count,
        series_count=series_count, first_received_at=study.first_received_at,
        last_received_at=study.last_received_at, completed_at=study.completed_at,
        pipelines=sorted(set(pipelines)), routing=routing_out(routing, pipelines),
        jobs=[job_out(j, study.study_uid, medians) for j in sorted(jobs, key=lambda j: -j.id)],
        deliveries=[delivery_out(d) for d in deliveries],
        notifications=[notification_out(n) for n in notifications], **extra)


def _related(session: Session, studies: Sequence[Study]
             ) -> tuple[dict[int, list[Job]], dict[str, list[Delivery]],
                        dict[str, list[Notification]], dict[int, int]]:
    ids = [s.id for s in studies]
    uids = [s.study_uid for s in studies]
    jobs: dict[int, list[Job]] = defaultdict(list)
    deliveries: dict[str, list[Delivery]] = defaultdict(list)
    notifications: dict[str, list[Notification]] = defaultdict(list)
    counts: dict[int, int] = {}
    if not ids:
        return jobs, deliveries, notifications, counts
    for job in session.execute(select(Job).where(Job.study_pk.in_(ids))).scalars():
        jobs[job.study_pk].append(job)
    for d in session.execute(select(Delivery).where(Delivery.study_uid.in_(uids))
                             .order_by(Delivery.id.desc())).scalars():
        deliveries[d.study_uid].append(d)
    for n in session.execute(select(Notification).where(Notification.study_uid.in_(uids))
                             .order_by(Notification.id.desc())).scalars():
        notifications[n.study_uid].append(n)
    for study_pk, count in session.execute(
            select(Series.study_pk, func.count(Series.id))
            .where(Series.study_pk.in_(ids)).group_by(Series.study_pk)):
        counts[study_pk] = count
    return jobs, deliveries, notifications, counts


def list_studies(db: Database, *, state: str | None = None, pipeline: str | None = None,
                 calling_aet: str | None = None, received_from: date | None = None,
                 received_to: date | None = None, q: str | None = None, offset: int = 0,
                 limit: int = 50) -> StudyPage:
    """Studies, newest first, with their jobs, deliveries and notifications.

    Parameters
    ----------
    db : Database
        The index.
    state : str, optional
        A study state (``receiving``, ``complete``) or a job state (``done``,
        ``failed``...) that one of the study's jobs is in.
    pipeline : str, optional
        Only studies with a job of this pipeline.
    calling_aet : str, optional
        Only studies sent by this AE title.
    received_from, received_to : date, optional
        Only studies whose last instance arrived on or between these days (UTC).
    q : str, optional
        An accession number or a Study Instance UID (exact, or a prefix of the UID).
    offset, limit : int
        Paging.

    Returns
    -------
    StudyPage
    """
    query = select(Study)
    if state:
        has_job = select(Job.id).where(Job.study_pk == Study.id, Job.state == state).exists()
        query = query.where(or_(Study.state == state, has_job))
    if pipeline:
        query = query.where(
            select(Job.id).where(Job.study_pk == Study.id, Job.pipeline == pipeline).exists())
    if calling_aet:
        query = query.where(Study.calling_aet == calling_aet)
    if received_from:
        query = query.where(Study.last_received_at >= datetime.combine(received_from, time(),
                                                                       tzinfo=UTC))
    if received_to:
        query = query.where(Study.last_received_at < datetime.combine(
            received_to + timedelta(days=1), time(), tzinfo=UTC))
    if q:
        q = q.strip()
        query = query.where(or_(Study.accession_number == q, Study.study_uid.startswith(
            q, autoescape=True)))
    with db.session() as session:
        total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
        studies = list(session.execute(
            query.order_by(Study.last_received_at.desc(), Study.id.desc())
            .offset(offset).limit(limit)).scalars())
        jobs, deliveries, notifications, counts = _related(session, studies)
        medians = _median_durations(session)
        out = [_study_out(s, jobs[s.id], deliveries[s.study_uid], notifications[s.study_uid],
                          counts.get(s.id, 0), medians) for s in studies]
    return StudyPage(total=total, offset=offset, limit=limit, studies=out)


def _patient(settings: Settings, session: Session, study: Study) -> PatientOut | None:
    """Patient name and ID read from one of the study's files (never logged)."""
    from pydicom import dcmread

    row = session.execute(
        select(Instance.path).join(Series, Instance.series_pk == Series.id)
        .where(Series.study_pk == study.id).limit(1)).scalar_one_or_none()
    if row is None:
        return None
    try:
        ds = dcmread(settings.spool_dir / row, stop_before_pixels=True,
                     specific_tags=["PatientName", "PatientID"])
    except (OSError, ValueError):
        return None
    return PatientOut(name=str(ds.get("PatientName", "")), id=str(ds.get("PatientID", "")))


def measurement_rows(result: dict[str, Any] | None) -> list[MeasurementOut]:
    """A pipeline's measurements (``PipelineResult.summary``) as table rows.

    The liver's figures and lesions, each organ's volume, each haemorrhage finding's
    probability and decision; other scalar figures as they are.
    """
    if not result:
        return []
    m = result.get("measurements") or {}
    rows: list[MeasurementOut] = []

    def add(name: str, value: Any, unit: str = "") -> None:
        rows.append(MeasurementOut(name=name, value=str(value), unit=unit))

    if "liver_volume_ml" in m:
        add("Liver volume", m["liver_volume_ml"], "ml")
        add("Lesions", m.get("lesion_count", 0))
        add("Total tumour volume", m.get("total_tumour_volume_ml", 0), "ml")
        add("Tumour to liver ratio", f"{100 * float(m.get('tumour_to_liver_ratio', 0)):.2f}",
            "%")
        for lesion in m.get("lesions") or []:
            n = lesion.get("id")
            add(f"Lesion {n} volume", lesion.get("volume_ml"), "ml")
            add(f"Lesion {n} longest axial diameter", lesion.get("longest_axial_diameter_mm"),
                "mm")
    for organ, volume in (m.get("volumes_ml") or {}).items():
        add(f"{organ} volume", volume, "ml")
    if m.get("absent"):
        add("Not found", ", ".join(m["absent"]))
    for finding, p in (result.get("probabilities") or {}).items():
        decided = (result.get("decisions") or {}).get(finding)
        add(f"{finding} probability", f"{float(p):.3f}",
            "positive" if decided else "negative")
    if "conclusion" in m:
        add("Conclusion", m["conclusion"])
    known = {"liver_volume_ml", "lesion_count", "total_tumour_volume_ml",
             "tumour_to_liver_ratio", "lesions", "volumes_ml", "absent", "conclusion"}
    for key, value in m.items():
        if key not in known and isinstance(value, str | int | float) \
                and not isinstance(value, bool):
            add(key, value)
    return rows


def get_study(db: Database, settings: Settings, study_uid: str, *, signed_in: bool = False
              ) -> StudyDetailOut | None:
    """Everything the study page shows; patient values only when ``signed_in``.

    Returns
    -------
    StudyDetailOut or None
        None when the index has no such study.
    """
    with db.session() as session:
        study = session.execute(select(Study).where(Study.study_uid == study_uid)
                                ).scalar_one_or_none()
        if study is None:
            return None
        jobs, deliveries, notifications, counts = _related(session, [study])
        series = [SeriesOut(series_uid=s.series_uid, modality=s.modality,
                            series_number=s.series_number, description=s.description,
                            instances=s.instance_count)
                  for s in session.execute(select(Series).where(Series.study_pk == study.id)
                                           .order_by(Series.series_number, Series.id)).scalars()]
        study_jobs = jobs[study.id]
        routing_job = next((j for j in sorted(study_jobs, key=lambda j: -j.id)
                            if j.pipeline is None and j.study_version == study.version), None)
        results = []
        for job in sorted(study_jobs, key=lambda j: -j.id):
            if job.pipeline is None or job.state not in FINISHED:
                continue
            files = result_files(job)
            summary = (job.result or {}).get("result")
            has_preview = any(f.kind in ("seg", "kos") for f in files) and \
                job.state == JobState.DONE.value
            results.append(ResultOut(
                job=job.id, pipeline=job.pipeline, state=job.state, reason=job.reason,
                preview_url=f"/api/v1/jobs/{job.id}/preview.png" if has_preview else None,
                measurements=measurement_rows(summary), files=files))
        audit = [AuditOut(ts=a.ts, event=a.event, user=(a.detail or {}).get("user"),
                          detail=a.detail)
                 for a in session.execute(
                     select(AuditEvent).where(AuditEvent.study_uid == study_uid)
                     .order_by(AuditEvent.id.desc()).limit(100)).scalars()]
        return _study_out(
            study, study_jobs, deliveries[study.study_uid], notifications[study.study_uid],
            counts.get(study.id, 0), _median_durations(session), cls=StudyDetailOut,
            series=series, routing_decision=routing_job.routing if routing_job else None,
            results=results, audit=audit,
            patient=_patient(settings, session, study) if signed_in else None)


def list_jobs(db: Database, *, state: str | None = None, pipeline: str | None = None,
              limit: int = 100) -> list[JobOut]:
    """Jobs, newest first, optionally of one state and one pipeline."""
    query = select(Job, Study.study_uid).join(Study, Job.study_pk == Study.id)
    if state:
        query = query.where(Job.state == state)
    if pipeline:
        query = query.where(Job.pipeline == pipeline)
    with db.session() as session:
        medians = _median_durations(session)
        return [job_out(job, uid, medians) for job, uid in session.execute(
            query.order_by(Job.id.desc()).limit(limit))]


def get_job(db: Database, job_id: int) -> JobOut | None:
    """One job, or None."""
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        return job_out(job, job.study.study_uid, _median_durations(session))


def list_deliveries(db: Database, *, state: str | None = None, limit: int = 100
                    ) -> list[DeliveryOut]:
    """Outbox entries, newest first."""
    query = select(Delivery)
    if state:
        query = query.where(Delivery.state == state)
    with db.session() as session:
        return [delivery_out(d) for d in session.execute(
            query.order_by(Delivery.id.desc()).limit(limit)).scalars()]


def list_notifications(db: Database, *, state: str | None = None, limit: int = 100
                       ) -> list[NotificationOut]:
    """Notifications (webhook calls), newest first."""
    query = select(Notification)
    if state:
        query = query.where(Notification.state == state)
    with db.session() as session:
        return [notification_out(n) for n in session.execute(
            query.order_by(Notification.id.desc()).limit(limit)).scalars()]


def pipelines(db: Database) -> tuple[list[PipelineOut], datetime | None]:
    """Installed pipelines and the node's last verdict on each (``pipelines.checked``)."""
    status = node_status(db, limit=0)
    checked = status["pipelines"] or {}
    states: dict[str, str] = checked.get("states") or {}
    at = datetime.fromisoformat(checked["checked_at"]) if checked.get("checked_at") else None
    names = sorted(set(registered()) | set(states))
    return [PipelineOut(name=n, available=None if n not in states else states[n] == "ok",
                        reason=None if states.get(n, "ok") == "ok" else states[n])
            for n in names], _aware(at)


def gpus() -> list[GpuOut]:
    """CUDA devices with their memory, when torch sees any (never starts CUDA itself)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        out.append(GpuOut(index=index, name=props.name, memory_total_bytes=props.total_memory,
                          memory_allocated_bytes=torch.cuda.memory_allocated(index),
                          memory_reserved_bytes=torch.cuda.memory_reserved(index)))
    return out


def health(db: Database, settings: Settings, node: Node | None = None) -> HealthOut:
    """Listener, associations, queue per priority, disk against the reserve, pipelines, GPUs.

    Parameters
    ----------
    db : Database
    settings : Settings
    node : Node, optional
        The node this dashboard runs in; without one the listener counts as down.
    """
    status = node_status(db, limit=0)
    listening = node is not None and node.scp.listening
    data_dir = settings.data_dir if settings.data_dir.exists() else Path(".")
    free = shutil.disk_usage(data_dir).free
    reserve = settings.disk_reserve_mb * 2**20
    found, checked_at = pipelines(db)
    return HealthOut(
        ae_title=settings.ae_title, listener_up=listening,
        port=node.scp.port if node is not None else settings.port,
        tls_port=node.scp.tls_port if node is not None else None,
        associations_open=node.scp.open_associations if node is not None else None,
        queue=[QueueOut(priority=q["priority"], name=priority_name(q["priority"]),
                        queued=q["queued"], running=q["running"]) for q in status["queue"]],
        disk_free_bytes=free, disk_reserve_bytes=reserve, disk_ok=free > reserve,
        pipelines=found, pipelines_checked_at=checked_at, gpus=gpus(),
        totals=status["totals"])
