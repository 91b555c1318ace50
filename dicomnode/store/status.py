"""What the node holds and where each study stands (``dicomnode status``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from dicomnode.store.db import Database
from dicomnode.store.models import (
    AuditEvent,
    Delivery,
    Job,
    JobState,
    Notification,
    Series,
    Study,
)


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _shown_target(url: str) -> str:
    """A webhook without credentials or query string (they may carry a token)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def node_status(db: Database, limit: int = 100) -> dict[str, Any]:
    """Studies, jobs, deliveries and urgent notifications with their states, newest first.

    Parameters
    ----------
    db : Database
        The index.
    limit : int
        At most this many of each.

    Returns
    -------
    dict
        JSON-serialisable; no patient-identifying values. ``queue`` lists, highest
        priority first, how many jobs are queued and running at each priority that has
        any (``workflow.jobs.PRIORITY`` names the levels).
    """
    with db.session() as session:
        studies = []
        for study in session.execute(
            select(Study).order_by(Study.last_received_at.desc()).limit(limit)
        ).scalars():
            series = session.execute(
                select(Series).where(Series.study_pk == study.id).order_by(Series.id)
            ).scalars()
            studies.append({
                "study_uid": study.study_uid,
                "state": study.state,
                "version": study.version,
                "completion_trigger": study.completion_trigger,
                "instances": study.instance_count,
                "calling_aet": study.calling_aet,
                "first_received_at": _ts(study.first_received_at),
                "last_received_at": _ts(study.last_received_at),
                "completed_at": _ts(study.completed_at),
                "series": [{
                    "series_uid": s.series_uid, "modality": s.modality,
                    "series_number": s.series_number, "description": s.description,
                    "instances": s.instance_count,
                } for s in series],
            })
        jobs = [{
            "id": job.id, "study_uid": job.study.study_uid, "version": job.study_version,
            "pipeline": job.pipeline, "state": job.state, "priority": job.priority,
            "reason": job.reason, "routing": job.routing, "timings": job.timings,
            "created_at": _ts(job.created_at), "finished_at": _ts(job.finished_at),
        } for job in session.execute(
            select(Job).order_by(Job.id.desc()).limit(limit)).scalars()]
        deliveries = [{
            "id": d.id, "study_uid": d.study_uid, "job": d.job_pk,
            "destination": f"{d.destination_ae}@{d.host}:{d.port}", "files": len(d.files),
            "state": d.state, "attempts": d.attempts, "last_error": d.last_error,
            "next_attempt_at": _ts(d.next_attempt_at), "sent_at": _ts(d.sent_at),
        } for d in session.execute(
            select(Delivery).order_by(Delivery.id.desc()).limit(limit)).scalars()]
        notifications = [{
            "id": n.id, "study_uid": n.study_uid, "job": n.job_pk, "channel": n.channel,
            "target": _shown_target(n.target), "state": n.state, "attempts": n.attempts,
            "last_error": n.last_error, "created_at": _ts(n.created_at),
            "next_attempt_at": _ts(n.next_attempt_at), "sent_at": _ts(n.sent_at),
        } for n in session.execute(
            select(Notification).order_by(Notification.id.desc()).limit(limit)).scalars()]
        checked = session.execute(
            select(AuditEvent).where(AuditEvent.event == "pipelines.checked")
            .order_by(AuditEvent.id.desc()).limit(1)).scalar_one_or_none()
        pipelines = ({"checked_at": _ts(checked.ts), "states": checked.detail or {}}
                     if checked is not None else None)
        # queue depth per priority: what waits, and what runs, at each level
        queue: dict[int, dict[str, int]] = {}
        for priority, state, count in session.execute(
                select(Job.priority, Job.state, func.count(Job.id))
                .where(Job.state.in_((JobState.QUEUED.value, JobState.RUNNING.value)))
                .group_by(Job.priority, Job.state)):
            queue.setdefault(priority, {"queued": 0, "running": 0})[state] = count
        totals = {
            "studies": session.execute(select(func.count(Study.id))).scalar_one(),
            "jobs": session.execute(select(func.count(Job.id))).scalar_one(),
            "deliveries": session.execute(select(func.count(Delivery.id))).scalar_one(),
            "notifications": session.execute(
                select(func.count(Notification.id))).scalar_one(),
        }
    return {"totals": totals, "pipelines": pipelines,
            "queue": [{"priority": p, **queue[p]} for p in sorted(queue, reverse=True)],
            "studies": studies, "jobs": jobs, "deliveries": deliveries,
            "notifications": notifications}
