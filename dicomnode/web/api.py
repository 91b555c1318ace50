"""The REST API under ``/api/v1``: studies, jobs, deliveries, notifications, pipelines,
health and the actions. The dashboard's pages call the same functions
(``web/queries.py``, ``web/actions.py``)."""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import FileResponse

from dicomnode.logs import fields
from dicomnode.store.models import Job
from dicomnode.web import actions, queries
from dicomnode.web.auth import Viewer, actor, viewer
from dicomnode.web.preview import PreviewError, job_preview
from dicomnode.web.schemas import (
    ActionOut,
    DeliveryOut,
    HealthOut,
    JobOut,
    NotificationOut,
    PipelineOut,
    RerouteIn,
    RerunIn,
    ResendIn,
    StudyDetailOut,
    StudyPage,
)

StudyUid = Annotated[str, Path(min_length=1, max_length=64, description="Study Instance UID")]
JobId = Annotated[int, Path(ge=1, le=2**31 - 1)]
State = Annotated[str | None, Query(max_length=16)]
Name = Annotated[str | None, Query(max_length=64)]
Limit = Annotated[int, Query(ge=1, le=500)]

#: Answers besides success, for the OpenAPI schema.
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Not signed in (or wrong credentials)."},
    404: {"description": "No such study or job."},
}
ACTION_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    403: {"description": "A cross-site request."},
    409: {"description": "The action does not apply now (the message says why)."},
    422: {"description": "An invalid value (unknown pipeline or peer)."},
}

router = APIRouter(prefix="/api/v1", tags=["api"])
log = logging.getLogger(__name__)


def _fail(exc: actions.ActionError) -> HTTPException:
    return HTTPException(exc.status, detail=str(exc))


@router.get("/studies", response_model=StudyPage, responses=ERRORS)
def get_studies(request: Request, who: Annotated[Viewer, Depends(viewer)], state: State = None,
                pipeline: Name = None, calling_aet: Annotated[str | None, Query(
                    max_length=16)] = None, received_from: date | None = None,
                received_to: date | None = None, q: Annotated[str | None, Query(
                    max_length=64, description="Accession number or Study Instance UID "
                    "(or its start)")] = None,
                offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
                limit: Limit = 50) -> StudyPage:
    """Studies, newest first, with their jobs, deliveries and notifications."""
    return queries.list_studies(
        request.app.state.db, state=state, pipeline=pipeline, calling_aet=calling_aet,
        received_from=received_from, received_to=received_to, q=q, offset=offset,
        limit=limit)


@router.get("/studies/{study_uid}", response_model=StudyDetailOut, responses=ERRORS)
def get_study(request: Request, study_uid: StudyUid,
              who: Annotated[Viewer, Depends(viewer)]) -> StudyDetailOut:
    """One study: routing explanation, results with measurements, audit trail.

    Patient name and ID are included only for a signed-in user.
    """
    state = request.app.state
    study = queries.get_study(state.db, state.settings, study_uid, signed_in=who.signed_in)
    if study is None:
        raise HTTPException(404, detail="no such study")
    return study


@router.post("/studies/{study_uid}/rerun", response_model=ActionOut, responses=ACTION_ERRORS)
def post_rerun(request: Request, study_uid: StudyUid, user: Annotated[str, Depends(actor)],
               body: Annotated[RerunIn | None, Body()] = None) -> ActionOut:
    """Queue the study's pipelines again on its current version (signed-in users)."""
    state = request.app.state
    try:
        return actions.rerun(state.db, study_uid, user, body.pipeline if body else None,
                             wake=state.wake)
    except actions.ActionError as exc:
        raise _fail(exc) from None


@router.post("/studies/{study_uid}/reroute", response_model=ActionOut, responses=ACTION_ERRORS)
def post_reroute(request: Request, study_uid: StudyUid, body: RerouteIn,
                 user: Annotated[str, Depends(actor)]) -> ActionOut:
    """Run another pipeline on the series routing chose (signed-in users)."""
    state = request.app.state
    try:
        return actions.reroute(state.db, study_uid, user, body.pipeline, wake=state.wake)
    except actions.ActionError as exc:
        raise _fail(exc) from None


@router.post("/studies/{study_uid}/resend", response_model=ActionOut, responses=ACTION_ERRORS)
def post_resend(request: Request, study_uid: StudyUid, body: ResendIn,
                user: Annotated[str, Depends(actor)]) -> ActionOut:
    """Send a job's results again to a configured peer or destination (signed-in users)."""
    state = request.app.state
    try:
        return actions.resend(state.db, state.settings, state.outbox, study_uid, user,
                              body.peer, body.job)
    except actions.ActionError as exc:
        raise _fail(exc) from None


@router.get("/jobs", response_model=list[JobOut], responses=ERRORS)
def get_jobs(request: Request, who: Annotated[Viewer, Depends(viewer)], state: State = None,
             pipeline: Name = None, limit: Limit = 100) -> list[JobOut]:
    """Jobs, newest first."""
    return queries.list_jobs(request.app.state.db, state=state, pipeline=pipeline,
                             limit=limit)


@router.get("/jobs/{job_id}", response_model=JobOut, responses=ERRORS)
def get_job(request: Request, job_id: JobId, who: Annotated[Viewer, Depends(viewer)]
            ) -> JobOut:
    """One job with its timings and result files."""
    job = queries.get_job(request.app.state.db, job_id)
    if job is None:
        raise HTTPException(404, detail="no such job")
    return job


@router.post("/jobs/{job_id}/cancel", response_model=ActionOut, responses=ACTION_ERRORS)
def post_cancel(request: Request, job_id: JobId, user: Annotated[str, Depends(actor)]
                ) -> ActionOut:
    """Cancel a queued job (signed-in users)."""
    try:
        return actions.cancel(request.app.state.db, job_id, user)
    except actions.ActionError as exc:
        raise _fail(exc) from None


@router.get("/jobs/{job_id}/files/{name}", response_class=FileResponse, responses={
    **ERRORS, 200: {"content": {"application/dicom": {}}, "description": "The DICOM file."}})
def get_result_file(request: Request, job_id: JobId,
                    name: Annotated[str, Path(max_length=128)],
                    who: Annotated[Viewer, Depends(viewer)]) -> FileResponse:
    """Download one result object of a job (only files the job recorded)."""
    with request.app.state.db.session() as session:
        job = session.get(Job, job_id)
        files = [FilePath(f) for f in ((job.result or {}).get("files") or [])] if job else []
    path = next((f for f in files if f.name == name), None)
    if path is None or not path.is_file():
        raise HTTPException(404, detail="no such result file")
    return FileResponse(path, media_type="application/dicom", filename=f"job{job_id}-{name}")


@router.get("/jobs/{job_id}/preview.png", response_class=Response, responses={
    **ERRORS, 200: {"content": {"image/png": {}}, "description": "The PNG preview."}})
def get_preview(request: Request, job_id: JobId, who: Annotated[Viewer, Depends(viewer)]
                ) -> Response:
    """A PNG of a job's result: slices with the SEG outlined, or the ICH key slices."""
    state = request.app.state
    try:
        data = job_preview(state.db, state.settings, job_id)
    except (PreviewError, OSError) as exc:
        raise HTTPException(404, detail=f"no preview: {exc}") from None
    except Exception as exc:  # a result the drawing code cannot read: the page goes on
        log.exception("web.preview_failed", extra=fields(job=job_id))
        raise HTTPException(404, detail=f"no preview: {type(exc).__name__}") from None
    return Response(data, media_type="image/png",
                    headers={"Cache-Control": "private, max-age=300"})


@router.get("/deliveries", response_model=list[DeliveryOut], responses=ERRORS)
def get_deliveries(request: Request, who: Annotated[Viewer, Depends(viewer)],
                   state: State = None, limit: Limit = 100) -> list[DeliveryOut]:
    """Outbox entries, newest first, with attempts and the last error."""
    return queries.list_deliveries(request.app.state.db, state=state, limit=limit)


@router.get("/notifications", response_model=list[NotificationOut], responses=ERRORS)
def get_notifications(request: Request, who: Annotated[Viewer, Depends(viewer)],
                      state: State = None, limit: Limit = 100) -> list[NotificationOut]:
    """Notifications (webhook calls), newest first, with attempts and the last error."""
    return queries.list_notifications(request.app.state.db, state=state, limit=limit)


@router.get("/pipelines", response_model=list[PipelineOut], responses=ERRORS)
def get_pipelines(request: Request, who: Annotated[Viewer, Depends(viewer)]
                  ) -> list[PipelineOut]:
    """Installed pipelines and whether each can run (the node's last check)."""
    return queries.pipelines(request.app.state.db)[0]


@router.get("/health", response_model=HealthOut, responses=ERRORS)
def get_health(request: Request, who: Annotated[Viewer, Depends(viewer)]) -> HealthOut:
    """Listener, associations, queue per priority, disk, pipelines, GPUs."""
    state = request.app.state
    return queries.health(state.db, state.settings, state.node)
