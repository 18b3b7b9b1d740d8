"""/metrics without the framework: the exposition of the last round, served from the
event loop while it is cached, and rendered in the thread pool when it is not.

A scrape is the one request that arrives every few seconds from every Prometheus, and
usually finds the bytes rendered already. Through FastAPI, a sync route costs a trip
to the thread pool plus routing and dependency resolution, about as much as node_exporter
spends gathering its metrics; here a cached scrape costs a dictionary lookup. It sits
inside HostCheck, so the Host header is checked as for every other route, and the route
stays declared in the app for the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

PATH = "/metrics"
HEADERS = [(b"content-type", CONTENT_TYPE_LATEST.encode("latin-1"))]


class MetricsFastPath:
    """ASGI middleware: GET or HEAD /metrics answered with `cached()`, else `render()`
    on a thread of its own; every other request goes on to the app.

    Renders take one thread, never the thread pool that changes use: scrapers arriving
    together after a round wait for it without holding a thread each."""

    def __init__(self, app: ASGIApp, cached: Callable[[], bytes | None],
                 render: Callable[[], bytes]):
        self.app = app
        self.cached = cached
        self.render = render
        self.limiter = anyio.CapacityLimiter(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] != PATH
                or scope["method"] not in ("GET", "HEAD")):
            await self.app(scope, receive, send)
            return
        body = self.cached()
        if body is None:
            body = await anyio.to_thread.run_sync(self.render, limiter=self.limiter)
        headers = [*HEADERS, (b"content-length", str(len(body)).encode("latin-1"))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body})
