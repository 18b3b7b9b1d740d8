"""The connections the API holds open: at most so many per listener, and none for long
without a request.

Reads need no token, so anyone who can reach the TCP port can open connections. Each
listener (the TCP port, the unix socket) holds at most `api.max_connections`; one more
is closed as soon as it is accepted, so a flood on the TCP port never takes the unix
socket's room (or the file descriptors the journal and the actuators need). A connection
must send a request's headers, and its body, within `api.header_timeout` of waiting for
one; else it is closed. uvicorn's own keep-alive timeout closes idle connections between
requests, but any byte received cancels it, which a half-sent request would exploit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import h11
from uvicorn.config import Config
from uvicorn.server import ServerState

from governor.api.auth import PeerCredProtocol

log = logging.getLogger(__name__)

Listener = Literal["tcp", "unix"]

#: a request is being received: the header timeout runs
RECEIVING = (h11.IDLE, h11.SEND_BODY)


@dataclass
class ConnectionLimits:
    """Shared by every connection of one server; touched on the event loop's thread only."""

    max_connections: int = 1024
    header_timeout: float = 10.0
    open: dict[str, int] = field(default_factory=lambda: {"tcp": 0, "unix": 0})
    refused: dict[str, int] = field(default_factory=lambda: {"tcp": 0, "unix": 0})
    timed_out: int = 0
    _said_at: float = float("-inf")

    def admit(self, listener: Listener) -> bool:
        if self.open[listener] >= self.max_connections:
            self.refused[listener] += 1
            now = time.monotonic()
            if now - self._said_at >= 60:
                self._said_at = now
                log.warning("the %s listener holds api.max_connections = %d open "
                            "connections; closing new ones at once (%d so far)", listener,
                            self.max_connections, self.refused[listener])
            return False
        self.open[listener] += 1
        return True

    def release(self, listener: Listener) -> None:
        self.open[listener] -= 1


class GuardedProtocol(PeerCredProtocol):
    """uvicorn's h11 protocol (with the unix socket's peer uid), counting its connection
    against its listener's limit and closing it when a request is slow to arrive."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *,
                 limits: ConnectionLimits | None = None, listener: Listener = "tcp"):
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits if limits is not None else ConnectionLimits()
        self.listener: Listener = listener
        # counted when accepted, before a TLS handshake: a handshake that never comes holds
        # its place too (asyncio ends it after ssl_handshake_timeout = header_timeout)
        self.admitted = self.limits.admit(listener)
        self._request_timer: asyncio.TimerHandle | None = None
        # asyncio never tells a protocol whose TLS handshake failed: its place is given
        # back once the handshake's time is surely up
        self._unmade: asyncio.TimerHandle | None = (
            self.loop.call_later(2 * self.limits.header_timeout + 1, self._never_made)
            if self.admitted else None)

    def connection_made(self, transport: Any) -> None:
        if self._unmade is not None:
            self._unmade.cancel()
            self._unmade = None
        if not self.admitted:
            self.transport = transport
            transport.abort()
            return
        super().connection_made(transport)
        self._await_request()

    def _never_made(self) -> None:
        self._unmade = None
        if self.admitted:
            self.admitted = False
            self.limits.release(self.listener)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self.admitted = False
        self.limits.release(self.listener)
        self._stop_request_timer()
        if self.flow is None:  # lost before it was made (a failed TLS handshake)
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state not in RECEIVING:
            self._stop_request_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state in RECEIVING:
            self._await_request()

    def _await_request(self) -> None:
        self._stop_request_timer()
        self._request_timer = self.loop.call_later(self.limits.header_timeout,
                                                   self._request_timed_out)

    def _stop_request_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _request_timed_out(self) -> None:
        self._request_timer = None
        if self.conn.their_state in RECEIVING and not self.transport.is_closing():
            self.limits.timed_out += 1
            self.transport.close()
