"""The FastAPI application: pages, the REST API, ``/metrics``.

``create_app`` takes the node's settings and database (and the running node, when there
is one: its workers are woken by actions, its listener shown on the health page, its
counters exposed). Without a node the dashboard still reads and acts on the index, as
``dicomnode status`` does; the node's threads pick the queued rows up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicomnode.config import Settings, WebSettings
from dicomnode.metrics import NodeMetrics
from dicomnode.pipelines.base import registered
from dicomnode.store.db import Database
from dicomnode.web import api, pages
from dicomnode.web.auth import Viewer, viewer
from dicomnode.web.metrics import DatabaseCollector
from dicomnode.workflow.export import Outbox

if TYPE_CHECKING:
    from dicomnode.node import Node


def create_app(settings: Settings, db: Database, node: Node | None = None) -> FastAPI:
    """Build the dashboard for one node.

    Parameters
    ----------
    settings : Settings
        The node's settings (``settings.web`` for authentication; the embedded default
        when it is None).
    db : Database
        The node's index (migrated).
    node : Node, optional
        The running node, if this process runs one.

    Returns
    -------
    FastAPI
    """
    app = FastAPI(title="dicomnode", version="1", summary=(
        "Studies, jobs, deliveries and notifications of a DICOM AI node, and actions on "
        "them."), docs_url="/api/docs", redoc_url=None)
    app.state.settings = settings
    app.state.web = settings.web or WebSettings()
    app.state.db = db
    app.state.node = node
    metrics = node.metrics if node is not None else NodeMetrics()
    metrics.registry.register(DatabaseCollector(db, node))
    app.state.metrics = metrics
    app.state.outbox = node.outbox if node is not None else Outbox(db, settings,
                                                                    metrics=metrics)
    app.state.wake = node.runner.wake if node is not None else None
    app.include_router(api.router)
    app.include_router(pages.router)

    @app.middleware("http")
    async def refuse_nul(request: Request, call_next: Any) -> Response:
        # No DICOM value holds a NUL character and PostgreSQL refuses one in a text
        # parameter (a server error): refused as a validation error, as FastAPI answers
        # any other invalid parameter.
        where = [("path", "path")] if "\x00" in request.scope.get("path", "") else []
        where += [("query", key) for key, value in request.query_params.multi_items()
                  if "\x00" in key or "\x00" in value]
        if where:
            return JSONResponse(status_code=422, content={"detail": [
                {"type": "string_pattern_mismatch", "loc": list(loc),
                 "msg": "NUL characters are not accepted", "input": None}
                for loc in where]})
        response: Response = await call_next(request)
        return response

    def openapi() -> dict[str, Any]:
        # the pipelines installed and the peers configured, as enums: a client (and a
        # schema-driven test) knows which values the actions accept
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version,
                                   summary=app.summary, routes=app.routes)
            models = document.get("components", {}).get("schemas", {})
            names = {"RerouteIn": ("pipeline", registered()), "RerunIn": (
                "pipeline", registered()), "ResendIn": ("peer", sorted(
                    set(settings.peers) | set(settings.destinations)))}
            for model, (field, values) in names.items():
                prop = models.get(model, {}).get("properties", {}).get(field)
                if prop is not None and values:
                    prop.pop("anyOf", None)
                    prop.update({"type": "string", "enum": values})
                    if model == "RerunIn":
                        prop.update({"type": ["string", "null"], "enum": [*values, None]})
            # the refusal of NUL characters (refuse_nul below), written into the schema
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    for parameter in operation.get("parameters", []):
                        schema = parameter.get("schema", {})
                        for variant in [schema, *schema.get("anyOf", [])]:
                            if variant.get("type") == "string" and "pattern" not in variant:
                                variant["pattern"] = "^[^\\x00]*$"
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/metrics", include_in_schema=False)
    def metrics_endpoint(request: Request, who: Annotated[Viewer, Depends(viewer)]
                         ) -> Response:
        """The node's metrics in the Prometheus text format."""
        return Response(generate_latest(request.app.state.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    return app
