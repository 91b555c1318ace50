"""The dashboard's pages, rendered on the server (Jinja2; no front-end build).

Studies (``/studies``), one study (``/studies/{study_uid}``: the urgent notification
links here), health (``/health``); the action buttons post forms here, which call the
same functions as the REST API and come back to the study page.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from dicomnode.store.models import JobState
from dicomnode.web import actions, queries
from dicomnode.web.auth import Viewer, actor, identify, viewer
from dicomnode.web.auth import _challenge as challenge

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))

router = APIRouter(include_in_schema=False)

#: Study and job states offered by the filter.
STATES = ("receiving", "complete", *(s.value for s in JobState))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _bytes(value: int | None) -> str:
    if value is None:
        return "gone"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024  # type: ignore[assignment]
    return str(value)


templates.env.filters["duration"] = _duration
templates.env.filters["bytes"] = _bytes
templates.env.filters["when"] = lambda v: v.strftime("%Y-%m-%d %H:%M:%S") if v else ""


def _render(request: Request, name: str, who: Viewer, status_code: int = 200,
            **context: Any) -> HTMLResponse:
    state = request.app.state
    return templates.TemplateResponse(request, name, {
        "who": who, "ae_title": state.settings.ae_title, "path": request.url.path,
        **context}, status_code=status_code)


@router.get("/")
def index() -> RedirectResponse:
    """The studies list is the front page."""
    return RedirectResponse("/studies", status_code=303)


@router.get("/login")
def login(request: Request, next: str = "/studies") -> Response:
    """Ask the browser for credentials, then go back to ``next`` (a path on this site)."""
    if identify(request, request.app.state.web) is None:
        raise challenge("sign in")
    target = next if next.startswith("/") and not next.startswith("//") else "/studies"
    return RedirectResponse(target, status_code=303)


@router.get("/studies", response_class=HTMLResponse)
def studies_page(request: Request, who: Annotated[Viewer, Depends(viewer)],
                 state: Annotated[str | None, Query(max_length=16)] = None,
                 pipeline: Annotated[str | None, Query(max_length=64)] = None,
                 calling_aet: Annotated[str | None, Query(max_length=16)] = None,
                 received_from: Annotated[str | None, Query(max_length=10)] = None,
                 received_to: Annotated[str | None, Query(max_length=10)] = None,
                 q: Annotated[str | None, Query(max_length=64)] = None,
                 offset: Annotated[int, Query(ge=0)] = 0) -> HTMLResponse:
    """Studies, newest first, with filters and search."""
    def day(value: str | None) -> date | None:
        try:
            return date.fromisoformat(value) if value else None
        except ValueError:
            return None

    filters = {"state": state or "", "pipeline": pipeline or "",
               "calling_aet": calling_aet or "", "received_from": received_from or "",
               "received_to": received_to or "", "q": q or ""}
    page = queries.list_studies(
        request.app.state.db, state=state or None, pipeline=pipeline or None,
        calling_aet=calling_aet or None, received_from=day(received_from),
        received_to=day(received_to), q=q or None, offset=offset, limit=50)
    busy = any(s.status in ("receiving", "routing", "queued", "running") for s in page.studies)
    query = urlencode({k: v for k, v in filters.items() if v})
    return _render(request, "studies.html", who, page=page, filters=filters, states=STATES,
                   pipelines=[p.name for p in queries.pipelines(request.app.state.db)[0]],
                   refresh=busy, query=query)


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(request: Request, study_uid: str, who: Annotated[Viewer, Depends(viewer)],
               done: Annotated[str | None, Query(max_length=200)] = None,
               error: Annotated[str | None, Query(max_length=500)] = None) -> HTMLResponse:
    """One study: routing, results with previews and measurements, actions, audit."""
    state = request.app.state
    study = queries.get_study(state.db, state.settings, study_uid[:64],
                              signed_in=who.signed_in)
    if study is None:
        return _render(request, "missing.html", who, status_code=404, study_uid=study_uid)
    busy = study.status in ("receiving", "routing", "queued", "running")
    peers = sorted(set(state.settings.peers) | set(state.settings.destinations))
    return _render(request, "study.html", who, study=study, refresh=busy, done=done,
                   error=error, peers=peers,
                   pipelines=[p.name for p in queries.pipelines(state.db)[0]])


@router.get("/health", response_class=HTMLResponse)
def health_page(request: Request, who: Annotated[Viewer, Depends(viewer)]) -> HTMLResponse:
    """Listener, associations, queue, disk, pipelines, GPU."""
    state = request.app.state
    return _render(request, "health.html", who,
                   health=queries.health(state.db, state.settings, state.node))


def _back(study_uid: str, result: actions.ActionOut | None = None,
          error: actions.ActionError | None = None) -> RedirectResponse:
    query = {"done": result.detail} if result is not None else {"error": str(error)[:400]}
    return RedirectResponse(f"/studies/{quote(study_uid, safe='')}?{urlencode(query)}",
                            status_code=303)


@router.post("/studies/{study_uid}/rerun")
def rerun_form(request: Request, study_uid: str, user: Annotated[str, Depends(actor)],
               pipeline: Annotated[str, Form(max_length=64)] = "") -> RedirectResponse:
    """The re-run button."""
    try:
        return _back(study_uid, actions.rerun(request.app.state.db, study_uid, user,
                                              pipeline or None, wake=request.app.state.wake))
    except actions.ActionError as exc:
        return _back(study_uid, error=exc)


@router.post("/studies/{study_uid}/reroute")
def reroute_form(request: Request, study_uid: str, user: Annotated[str, Depends(actor)],
                 pipeline: Annotated[str, Form(max_length=64)]) -> RedirectResponse:
    """The re-route form."""
    try:
        return _back(study_uid, actions.reroute(request.app.state.db, study_uid, user,
                                                pipeline, wake=request.app.state.wake))
    except actions.ActionError as exc:
        return _back(study_uid, error=exc)


@router.post("/studies/{study_uid}/resend")
def resend_form(request: Request, study_uid: str, user: Annotated[str, Depends(actor)],
                peer: Annotated[str, Form(max_length=64)],
                job: Annotated[int | None, Form()] = None) -> RedirectResponse:
    """The re-send form."""
    state = request.app.state
    try:
        return _back(study_uid, actions.resend(state.db, state.settings, state.outbox,
                                               study_uid, user, peer, job))
    except actions.ActionError as exc:
        return _back(study_uid, error=exc)


@router.post("/jobs/{job_id}/cancel")
def cancel_form(request: Request, job_id: int, user: Annotated[str, Depends(actor)],
                study_uid: Annotated[str, Form(max_length=64)]) -> RedirectResponse:
    """The cancel button of a queued job."""
    try:
        return _back(study_uid, actions.cancel(request.app.state.db, job_id, user))
    except actions.ActionError as exc:
        if exc.status == 404:
            raise HTTPException(404, detail=str(exc)) from None
        return _back(study_uid, error=exc)
