"""The FastAPI application: open read-only routes, and token-guarded changes, behind a
Host header check; its OpenAPI document states every status a route can answer."""

from collections.abc import Iterable
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Query
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from governor import __version__
from governor.api import models
from governor.api.auth import Authenticator
from governor.api.bodies import BodyGuard
from governor.api.errors import ApiError, install_error_handlers
from governor.api.events import EventReads
from governor.api.hosts import HostCheck, default_allowed_hosts
from governor.api.jobs import TOKEN, errors, job_router
from governor.api.scrape import MetricsFastPath
from governor.config import ConfigError
from governor.control.controller import Controller
from governor.jobs.registry import Caller
from governor.service.audit import AuditLog
from governor.snapshot import Snapshot


class DaemonView(Protocol):
    """What the API needs from the daemon; it never reaches hardware or actuators."""

    controller: Controller
    audit: AuditLog

    def health(self) -> tuple[bool, str]: ...

    def latest(self) -> Snapshot | None: ...

    def render_metrics(self) -> bytes: ...

    def cached_metrics(self) -> bytes | None:
        """The exposition if it is rendered for the current round, else None."""
        ...

    def reload(self, who: str = ...) -> list[dict[str, Any]]:
        """Reload the config file; ConfigError keeps the running config. `who` asked."""
        ...


def create_app(daemon: DaemonView, authenticate: Authenticator,
               allowed_hosts: Iterable[str] | None = None,
               max_body_bytes: int = 64 * 1024) -> FastAPI:
    """`allowed_hosts`: the Host header values answered; None: this machine's names.
    `max_body_bytes`: the largest request body read (api.max_body_bytes)."""
    app = FastAPI(
        title="governor",
        version=__version__,
        description="Samples CPUs, GPUs and accelerators; pauses or slows registered jobs "
        "when the hardware runs hot.",
    )
    install_error_handlers(app)
    # inside HostCheck (the middleware added last runs first): scrapes are checked too
    app.add_middleware(MetricsFastPath, cached=daemon.cached_metrics,
                       render=daemon.render_metrics)
    app.add_middleware(
        HostCheck,
        allowed=default_allowed_hosts("localhost") if allowed_hosts is None else allowed_hosts,
    )
    # outermost: no body is read before its size and its sender are checked
    app.add_middleware(BodyGuard, authenticate=authenticate, max_bytes=max_body_bytes)
    reads = EventReads(lambda: daemon.audit)

    @app.get("/healthz", summary="200 while the sampling loop keeps its cadence, else 503",
             response_model=models.Healthy, responses={
                 **errors(),
                 503: {"model": models.Unhealthy,
                       "description": "No sampling round has completed for 3 intervals."}})
    async def healthz() -> JSONResponse:
        ok, why = daemon.health()
        if ok:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy", "error": why}, status_code=503)

    # Served by MetricsFastPath before routing; declared here for the OpenAPI document
    # (and answered here only if the fast path were taken out). A sync route: rendering
    # runs in the thread pool. It reads the last snapshot only; no hardware I/O happens.
    @app.get("/metrics", summary="Prometheus text exposition of the last sampling round",
             response_class=Response, responses={
                 **errors(),
                 200: {"description": "Prometheus text format",
                       "content": {"text/plain": {"schema": {"type": "string"}}}}})
    def metrics() -> Response:
        return Response(daemon.render_metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/status", summary="Samplers, readings, rules and jobs",
             response_model=models.Status, responses=errors())
    async def status() -> models.AsBuilt:
        snapshot = daemon.latest()
        view = daemon.controller.view
        body: dict[str, Any] = {"samplers": [], "readings": []}
        if snapshot is not None:
            body.update(snapshot.as_dict())
        body["rules"] = list(view.rules)
        body["jobs"] = [job.as_json() for job in view.jobs]
        body["power_caps"] = daemon.controller.power_caps
        body["audit"] = daemon.audit.status()
        return models.AsBuilt(body)

    # Read on threads of their own, never on the event loop nor in the thread pool the
    # changes use; a few reads at a time (governor/api/events.py).
    @app.get("/v1/events", response_model=models.Events, responses=errors(422, 503),
             summary="The audit log: actions and operator requests with time > since, oldest "
             "first, at most limit of them; page on with since = the last event's time")
    async def events(
        since: Annotated[float, Query(allow_inf_nan=False,
                                      description="Unix time; only events after it")] = 0.0,
        limit: Annotated[int, Query(ge=1, le=10000, description="at most this many")] = 1000,
    ) -> Response:
        return reads.answer(since, limit)

    app.include_router(job_router(daemon.controller, authenticate))

    @app.post("/v1/reload", summary="Reload the config file; a bad one changes nothing",
              response_model=models.Reloaded, openapi_extra=TOKEN, responses={
                  **errors(401, 403),
                  422: {"model": models.ReloadRefused,
                        "description": "The file is bad: the running config stays. "
                                       "`problems` names each key."}})
    def reload(caller: Annotated[Caller, Depends(authenticate)]) -> Response:
        if caller.restricted:
            raise ApiError(403, "Only root or a token holder may reload the config.")
        try:
            return models.AsBuilt({"rules": daemon.reload(who=str(caller))})
        except ConfigError as exc:
            return JSONResponse(
                {"error": f"The config was not reloaded: {exc.lines()[0]}",
                 "problems": exc.lines()},
                status_code=422,
            )

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, minus the 422 `HTTPValidationError` it adds to routes with
    parameters: validation errors here answer ErrorBody, and only where documented."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version,
                               description=app.description, routes=app.routes)
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                default = operation.get("responses", {}).get("422", {})
                if "HTTPValidationError" in str(default.get("content")):
                    del operation["responses"]["422"]
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        document["components"]["securitySchemes"] = {"bearerToken": {
            "type": "http", "scheme": "bearer",
            "description": "The token in api.token_file. Over the unix socket (api.socket) "
                           "no token is needed: the caller's uid decides."}}
        app.openapi_schema = document
    return app.openapi_schema
