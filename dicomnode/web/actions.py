"""What a signed-in user may do from the dashboard or the API, each audited.

Re-run a study's pipelines, run another pipeline on the series routing chose (re-route),
send a job's results again to a configured peer, cancel a queued job. Every action is
one transaction that also writes an ``AuditEvent`` (``web.<action>``, the user in its
detail, its time in ``ts``); the node's workers and outbox pick the rows up as they
would any other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select, update

from dicomnode.config import Settings
from dicomnode.logs import fields
from dicomnode.pipelines.base import registered
from dicomnode.store.db import Database, rowcount
from dicomnode.store.models import AuditEvent, Job, JobState, Study, StudyState, utcnow
from dicomnode.web.schemas import ActionOut
from dicomnode.workflow.completion import ROUTING_PRIORITY
from dicomnode.workflow.export import Outbox, Target
from dicomnode.workflow.jobs import PRIORITY

log = logging.getLogger(__name__)


class ActionError(ValueError):
    """An action that cannot be done; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


_ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)


def _study(session: object, study_uid: str) -> Study:
    study = session.execute(  # type: ignore[attr-defined]
        select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
    if study is None:
        raise ActionError(f"Invalid 'study_uid' value '{study_uid}' - no such study", 404)
    if study.state != StudyState.COMPLETE.value:
        raise ActionError(f"study {study_uid} is still receiving; it is processed once "
                          "complete")
    return study


def _latest(jobs: list[Job], version: int) -> dict[str | None, Job]:
    latest: dict[str | None, Job] = {}
    for job in sorted(jobs, key=lambda j: j.id):
        if job.study_version == version:
            latest[job.pipeline] = job
    return latest


def _audit(user: str, action: str, study_uid: str, **detail: object) -> AuditEvent:
    log.info(f"web.{action}", extra=fields(user=user, study=study_uid,
                                           **{k: str(v) for k, v in detail.items()}))
    return AuditEvent(event=f"web.{action}", study_uid=study_uid,
                      detail={"user": user, **detail})


def rerun(db: Database, study_uid: str, user: str, pipeline: str | None = None,
          wake: Callable[[], None] | None = None) -> ActionOut:
    """Queue the study's pipelines again on its current version.

    Parameters
    ----------
    db : Database
    study_uid : str
    user : str
        Who asked (audited).
    pipeline : str, optional
        Only this pipeline (it must have run on this version); default each pipeline
        that did, or routing when none did.
    wake : callable, optional
        Tells the node's workers to look for work now.

    Returns
    -------
    ActionOut
        The jobs queued.

    Raises
    ------
    ActionError
        No such study (404), still receiving, the pipeline did not run on it, or a job
        of it is already queued or running (409).
    """
    with db.transaction() as session:
        study = _study(session, study_uid)
        latest = _latest(list(study.jobs), study.version)
        if pipeline is not None:
            if pipeline not in latest:
                raise ActionError(f"Invalid 'pipeline' value '{pipeline}' - it did not run on "
                                  f"version {study.version} of this study; re-route instead")
            chosen = [latest[pipeline]]
        else:
            chosen = [j for p, j in latest.items() if p is not None] or \
                ([latest[None]] if None in latest else [])
        busy = [j for j in chosen if j.state in _ACTIVE]
        if busy:
            raise ActionError(f"job {busy[0].id} ({busy[0].pipeline or 'routing'}) is already "
                              f"{busy[0].state}")
        new = [Job(study=study, study_version=study.version, pipeline=j.pipeline,
                   priority=j.priority, attempts=0, routing=j.routing) for j in chosen]
        if not new:
            new = [Job(study=study, study_version=study.version, pipeline=None,
                       priority=ROUTING_PRIORITY, attempts=0)]
        session.add_all(new)
        session.flush()
        ids = [j.id for j in new]
        session.add(_audit(user, "rerun", study_uid, jobs=ids,
                           pipelines=[j.pipeline or "routing" for j in new],
                           replaces=[j.id for j in chosen]))
    if wake is not None:
        wake()
    return ActionOut(action="rerun", study_uid=study_uid, jobs=ids,
                     detail=f"queued {len(ids)} job(s)")


def reroute(db: Database, study_uid: str, user: str, pipeline: str,
            wake: Callable[[], None] | None = None) -> ActionOut:
    """Run ``pipeline`` on the series routing chose for the study's current version.

    Raises
    ------
    ActionError
        No such study (404), an unknown pipeline, a study not routed yet or without a
        usable series, or that pipeline already queued or running (409).
    """
    if pipeline not in registered():
        raise ActionError(f"Invalid 'pipeline' value '{pipeline}' - installed: "
                          f"{', '.join(registered())}", 422)
    with db.transaction() as session:
        study = _study(session, study_uid)
        latest = _latest(list(study.jobs), study.version)
        routing_job = latest.get(None)
        decision = (routing_job.routing if routing_job is not None else None) or next(
            (j.routing for j in latest.values() if j.routing), None)
        series = ((decision or {}).get("series") or {}).get("series_instance_uid")
        if not series:
            raise ActionError("this study has no routed series yet (routing has not run, or "
                              "found no usable CT series)")
        if pipeline in latest and latest[pipeline].state in _ACTIVE:
            raise ActionError(f"{pipeline} is already {latest[pipeline].state} on this study")
        assert decision is not None
        action = {"pipeline": pipeline, "priority": "normal", "destinations": None,
                  "series_instance_uid": series, "series_reason": "chosen by routing",
                  "rule": f"re-routed by {user}"}
        job = Job(study=study, study_version=study.version, pipeline=pipeline,
                  priority=PRIORITY["normal"], attempts=0,
                  routing={**decision, "action": action})
        session.add(job)
        session.flush()
        job_id = job.id
        session.add(_audit(user, "reroute", study_uid, jobs=[job_id], pipeline=pipeline))
    if wake is not None:
        wake()
    return ActionOut(action="reroute", study_uid=study_uid, jobs=[job_id],
                     detail=f"queued {pipeline}")


def _target(settings: Settings, peer: str, user: str) -> Target:
    if peer in settings.peers:
        p = settings.peers[peer]
        return Target(p.ae_title or peer, p.host, p.port, f"re-sent by {user}")
    if peer in settings.destinations:
        d = settings.destinations[peer]
        return Target(d.ae_title, d.host, d.port, f"re-sent by {user}")
    known = sorted(set(settings.peers) | set(settings.destinations))
    raise ActionError(f"Invalid 'peer' value '{peer}' - configured peers and destinations: "
                      f"{', '.join(known) or 'none'}", 422)


def resend(db: Database, settings: Settings, outbox: Outbox, study_uid: str, user: str,
           peer: str, job_id: int | None = None) -> ActionOut:
    """Queue a job's result files again for a configured peer or destination.

    Raises
    ------
    ActionError
        No such study or job (404), an unknown peer (422), or no result files (409).
    """
    target = _target(settings, peer, user)
    with db.session() as session:
        study = session.execute(select(Study).where(Study.study_uid == study_uid)
                                ).scalar_one_or_none()
        if study is None:
            raise ActionError(f"Invalid 'study_uid' value '{study_uid}' - no such study", 404)
        jobs = sorted(study.jobs, key=lambda j: -j.id)
        if job_id is not None:
            jobs = [j for j in jobs if j.id == job_id]
            if not jobs:
                raise ActionError(f"Invalid 'job' value '{job_id}' - not a job of this study",
                                  404)
        job = next((j for j in jobs if (j.result or {}).get("files")), None)
        if job is None:
            raise ActionError("no results to send: no job of this study wrote result files")
        files = [Path(f) for f in job.result["files"]]  # type: ignore[index]
        chosen = job.id
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ActionError(f"result files of job {chosen} are gone: {', '.join(missing)}")
    delivery = outbox.enqueue(files, target, study_uid=study_uid, job_pk=chosen)
    with db.transaction() as session:
        session.add(_audit(user, "resend", study_uid, job=chosen, delivery=delivery,
                           peer=peer))
    return ActionOut(action="resend", study_uid=study_uid, jobs=[chosen],
                     deliveries=[delivery], detail=f"queued for {target.ae_title}")


def cancel(db: Database, job_id: int, user: str) -> ActionOut:
    """Cancel a queued job (a running one finishes: stopping a model half-way gains nothing).

    Raises
    ------
    ActionError
        No such job (404), or a job that is no longer queued (409).
    """
    with db.transaction() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise ActionError(f"Invalid 'job' value '{job_id}' - no such job", 404)
        study_uid = job.study.study_uid
        changed = rowcount(session.execute(
            update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED.value)
            .values(state=JobState.CANCELLED.value, reason=f"cancelled by {user}",
                    finished_at=utcnow())))
        if not changed:
            raise ActionError(f"job {job_id} is {job.state}, not queued; only a queued job "
                              "can be cancelled")
        session.add(_audit(user, "cancel", study_uid, jobs=[job_id],
                           pipeline=job.pipeline or "routing"))
    return ActionOut(action="cancel", study_uid=study_uid, jobs=[job_id],
                     detail=f"job {job_id} cancelled")
