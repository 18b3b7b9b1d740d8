"""Request bodies: read only after the sender is known, and never more than
`api.max_body_bytes` of one.

FastAPI reads a route's body before it resolves the route's dependencies, token check
included, so without this any client could make the daemon hold a body of any size just
to be told its token is missing. Here, in front of the app, a request that carries a body
is refused with 413 when its Content-Length is over the limit, and a change (anything but
GET, HEAD, OPTIONS) is authenticated; both before a byte of the body is read. Then the
body is read, counting bytes (a chunked body has no Content-Length), and handed to the
app whole. A response sent while the body is still unread closes the connection, so the
rest of it is never read either.

The body of every change is JSON, whatever its Content-Type says: `curl -d '{...}'` sends
`application/x-www-form-urlencoded`, and a script that forgot `-H 'Content-Type:
application/json'` would otherwise get a 422 about "a valid dictionary" that says nothing
of the header (Docker's API reads its bodies the same way). A body that is not JSON is a
400 that says so.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from governor.api.auth import Authenticator
from governor.api.errors import ApiError, error_response

#: methods whose routes take no body: not authenticated here (reads are open)
READS = frozenset({"GET", "HEAD", "OPTIONS"})


def as_json(scope: Scope) -> Scope:
    """The request with its Content-Type set to JSON, the one body type the API takes."""
    headers = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


class BodyGuard:
    """ASGI middleware: the body limit and authentication before any body is read."""

    def __init__(self, app: ASGIApp, authenticate: Authenticator, max_bytes: int):
        self.app = app
        self.authenticate = authenticate
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if not chunked and (length is None or length.strip() in ("", "0")):
            await self.app(scope, receive, send)
            return
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, self._too_large())
            return
        if scope["method"] not in READS:
            try:
                self.authenticate.check(scope)
            except ApiError as exc:
                await self._refuse(scope, receive, send, exc)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks),
                                "more_body": False}
        if scope["method"] not in READS:
            scope = as_json(scope)

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"The request body is larger than api.max_body_bytes = "
                             f"{self.max_bytes} bytes.")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, exc: ApiError) -> None:
        """Answer without reading the body, and close the connection after the answer."""
        response = error_response(exc.status, exc.message, headers={"connection": "close"})
        await response(scope, receive, send)
