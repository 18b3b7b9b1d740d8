"""GET /v1/events: reads of the audit log, which anyone may make, kept from slowing the
changes that write it.

A read runs on threads of its own (two), never on the thread pool that FastAPI's sync
routes share (anyio's 40 threads), where sixty reads in flight once made an operator's
pause wait 25 s for a thread. At most four reads are in flight; one more is answered 503
at once. The events go out in batches as they are read, a batch at a time: a client that
does not read its answer holds its place, not a copy of the whole answer, and the daemon
holds at most a batch per read; and a client that takes no batch for `SEND_TIMEOUT` is
cut off, so four that never read cannot keep everyone else out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.to_thread
from pydantic import TypeAdapter
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from governor.api.errors import error_response
from governor.service.audit import AuditLog, Event, EventReader

#: reads in flight at once; one more gets 503
READERS = 4
#: threads that read the files, for all of them
THREADS = 2
#: events read and sent at a time
BATCH = 500
#: how long a client may take to take a batch; one that stops reading is cut off then, so
#: four clients that never read cannot hold every place for good
SEND_TIMEOUT = 10.0

_ANY = TypeAdapter(Any)


class EventReads:
    """Admits reads of the audit log; counted on the event loop's thread only."""

    def __init__(self, audit: Callable[[], AuditLog], readers: int = READERS,
                 threads: int = THREADS):
        """`audit`: the daemon's audit log, looked up at each read."""
        self.audit = audit
        self.free = readers
        self.limiter = anyio.CapacityLimiter(threads)

    def answer(self, since: float, limit: int) -> Response:
        if self.free <= 0:
            return too_many()
        self.free -= 1
        return EventStream(self._batches(since, limit), release=self._release)

    def _release(self) -> None:
        self.free += 1

    async def _batches(self, since: float, limit: int) -> AsyncIterator[bytes]:
        """The body, `{"events": [...]}`, in pieces; pydantic writes each event as
        FastAPI would (NaN as null)."""
        reader: EventReader = await self._run(self.audit().reader, since)
        try:
            yield b'{"events":['
            left, first = limit, True
            while left > 0:
                count, piece = await self._run(_encoded, reader, min(left, BATCH))
                if not count:
                    break
                left -= count
                yield piece if first else b"," + piece
                first = False
            yield b"]}"
        finally:
            reader.close()

    async def _run(self, call: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(call, *args, limiter=self.limiter)


def _encoded(reader: EventReader, count: int) -> tuple[int, bytes]:
    """Up to `count` events, as JSON separated by commas, and how many there are."""
    events: list[Event] = reader.take(count)
    return len(events), b",".join(_ANY.dump_json(event) for event in events)


def too_many() -> JSONResponse:
    return error_response(503, f"{READERS} reads of the audit log are in flight already; "
                               "try again in a moment.", headers={"retry-after": "1"})


class EventStream(Response):
    """A JSON body sent as it is made; `release` is called once it is sent or abandoned."""

    media_type = "application/json"

    def __init__(self, pieces: AsyncIterator[bytes], release: Callable[[], None]):
        super().__init__(media_type=self.media_type)
        self.pieces = pieces
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for piece in self.pieces:
                with anyio.move_on_after(SEND_TIMEOUT) as waited:
                    await send({"type": "http.response.body", "body": piece,
                                "more_body": True})
                if waited.cancelled_caught:
                    # the answer is left unfinished: the server closes the connection
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(self.pieces, "aclose", None)
            if aclose is not None:
                await aclose()
            self.release()
