"""The connections the API holds open: at most so many per listener, and none for long
without a request.

Reads need no token, so anyone who can reach the TCP port can open connections. Each
listener (the TCP port, the unix socket) holds at most `api.max_connections`; one more
is closed as soon as it is accepted, so a flood on the TCP port never takes the unix
socket's room (or the file descriptors the journal and the actuators need). A connection
must send a request's headers, and its body, within `api.header_timeout` of waiting for
one; else it is closed. uvicorn's own keep-alive timeout closes idle connections between
requests, but any byte received cancels it, which a half-sent request would exploit.

On the unix socket the kernel names each peer (SO_PEERCRED), so the socket's room is
shared out by uid: a user other than root holds at most `api.max_connections_per_user`
of it, and root is always let in. One member of the socket's group cannot fill the
socket and lock root's CLI, or the other users, out.
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

from governor.api.auth import PeerCredProtocol, peer_uid_of

log = logging.getLogger(__name__)

Listener = Literal["tcp", "unix"]

#: a request is being received: the header timeout runs
RECEIVING = (h11.IDLE, h11.SEND_BODY)


@dataclass
class ConnectionLimits:
    """Shared by every connection of one server; touched on the event loop's thread only."""

    max_connections: int = 1024
    header_timeout: float = 10.0
    #: the unix socket's connections one uid other than root may hold
    max_per_user: int = 64
    open: dict[str, int] = field(default_factory=lambda: {"tcp": 0, "unix": 0})
    refused: dict[str, int] = field(default_factory=lambda: {"tcp": 0, "unix": 0})
    #: the unix socket's open connections by peer uid
    by_uid: dict[int, int] = field(default_factory=dict)
    timed_out: int = 0
    _said_at: float = float("-inf")

    def admit(self, listener: Listener, uid: int | None = None) -> bool:
        """Room for one more connection on the listener (from `uid`, on the unix socket):
        root on the unix socket always has it."""
        if uid == 0:
            self.open[listener] += 1
            return True
        if uid is not None and self.by_uid.get(uid, 0) >= self.max_per_user:
            return self._refuse(listener, f"uid {uid} holds api.max_connections_per_user = "
                                          f"{self.max_per_user} of its connections")
        if self.open[listener] >= self.max_connections:
            return self._refuse(listener, f"it holds api.max_connections = "
                                          f"{self.max_connections} open connections")
        self.open[listener] += 1
        if uid is not None:
            self.by_uid[uid] = self.by_uid.get(uid, 0) + 1
        return True

    def _refuse(self, listener: Listener, why: str) -> bool:
        self.refused[listener] += 1
        now = time.monotonic()
        if now - self._said_at >= 60:
            self._said_at = now
            log.warning("the %s listener closes new connections at once: %s (%d so far)",
                        listener, why, self.refused[listener])
        return False

    def release(self, listener: Listener, uid: int | None = None) -> None:
        self.open[listener] -= 1
        if uid is not None and uid != 0:
            left = self.by_uid.get(uid, 0) - 1
            if left > 0:
                self.by_uid[uid] = left
            else:
                self.by_uid.pop(uid, None)


class GuardedProtocol(PeerCredProtocol):
    """uvicorn's h11 protocol (with the unix socket's peer uid), counting its connection
    against its listener's limit and closing it when a request is slow to arrive."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *,
                 limits: ConnectionLimits | None = None, listener: Listener = "tcp"):
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits if limits is not None else ConnectionLimits()
        self.listener: Listener = listener
        #: the unix-socket peer's uid, known once the connection is made
        self.uid: int | None = None
        # a TCP connection is counted when accepted, before a TLS handshake: a handshake
        # that never comes holds its place too (asyncio ends it after
        # ssl_handshake_timeout = header_timeout); a unix one once its peer is known
        self.admitted = self.limits.admit(listener) if listener == "tcp" else False
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
        if self.listener == "unix":
            self.uid = peer_uid_of(transport)
            self.admitted = self.limits.admit("unix", self.uid)
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
            self.limits.release(self.listener, self.uid)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self.admitted = False
        self.limits.release(self.listener, self.uid)
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
