"""The FastAPI application: open read-only routes for health, metrics and status."""

from __future__ import annotations

from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from governor import __version__
from governor.api.errors import install_error_handlers
from governor.snapshot import Snapshot


class DaemonView(Protocol):
    """What the API needs from the daemon; it never reaches hardware through it."""

    def health(self) -> tuple[bool, str]: ...

    def latest(self) -> Snapshot | None: ...

    def render_metrics(self) -> bytes: ...


def create_app(daemon: DaemonView) -> FastAPI:
    app = FastAPI(
        title="governor",
        version=__version__,
        description="Samples CPUs, GPUs and accelerators; pauses or slows registered jobs "
        "when the hardware runs hot.",
    )
    install_error_handlers(app)

    @app.get("/healthz", summary="200 while the sampling loop keeps its cadence, else 503")
    async def healthz() -> JSONResponse:
        ok, why = daemon.health()
        if ok:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy", "error": why}, status_code=503)

    # A sync route: FastAPI runs it in its thread pool, so rendering never stalls the
    # event loop. It reads the last snapshot only; no hardware I/O happens here.
    @app.get("/metrics", summary="Prometheus text exposition of the last sampling round")
    def metrics() -> Response:
        return Response(daemon.render_metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/status", summary="Samplers, readings, rules and jobs")
    async def status() -> dict[str, Any]:
        snapshot = daemon.latest()
        body: dict[str, Any] = {"samplers": [], "readings": [], "rules": [], "jobs": []}
        if snapshot is not None:
            body.update(snapshot.as_dict())
        return body

    return app
