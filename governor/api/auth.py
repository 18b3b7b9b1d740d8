"""Who is asking: a bearer token over TCP, or the peer's uid over the unix socket.

Reads are open; mutating requests need the token (compared in constant time), or come
over the unix socket, where the kernel tells the caller's uid (SO_PEERCRED): root may
govern any process, other users only their own.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import struct
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import Scope
from uvicorn.protocols.http.h11_impl import H11Protocol

from governor.api.errors import ApiError
from governor.jobs.registry import Caller

log = logging.getLogger(__name__)

#: the ASGI scope key carrying a unix-socket peer's uid; only PeerCredProtocol sets it
PEER_UID = "governor.peer_uid"


def ensure_token(path: str) -> str | None:
    """The token in `path`, created (random, mode 0600) if missing; None when path is ""."""
    if not path:
        return None
    file = Path(path)
    if not file.exists():
        file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            log.info("created a new API token in %s (mode 0600)", file)
    token = file.read_text().strip()
    if not token:
        raise ValueError(f"the token file {file} is empty")
    return token


def peer_uid_of(transport: Any) -> int | None:
    """The uid the kernel gives for a unix-socket peer (SO_PEERCRED); None over TCP."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class PeerCredProtocol(H11Protocol):
    """uvicorn's h11 protocol that, on a unix-socket connection, asks the kernel for the
    peer's uid (SO_PEERCRED) and puts it in every request's ASGI scope. Nothing a client
    sends (headers, addresses) can reach that key; the daemon also runs uvicorn with
    proxy headers off, so X-Forwarded-For cannot rewrite who the client is."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        uid = peer_uid_of(transport)
        if uid is None:
            return
        app = self.app

        async def with_peer_uid(scope: Any, receive: Any, send: Any) -> None:
            await app({**scope, PEER_UID: uid}, receive, send)

        self.app = with_peer_uid


def peer_uid(request: Request) -> int | None:
    uid = request.scope.get(PEER_UID)
    return uid if isinstance(uid, int) else None


class Authenticator:
    def __init__(self, token: str | None, allow_unauthenticated: bool):
        self._token = token
        self._open = allow_unauthenticated

    def __call__(self, request: Request) -> Caller:
        """FastAPI dependency of every mutating route."""
        return self.check(request.scope)

    def check(self, scope: Scope) -> Caller:
        """Who sent the request whose ASGI scope this is; ApiError if it may change
        nothing. Needs only the headers: a request's body is read after it."""
        uid = scope.get(PEER_UID)
        if isinstance(uid, int):
            return Caller(None if uid == 0 else uid, f"uid {uid} (unix socket)")
        if self._token is None:
            if self._open:
                return Caller(None, "unauthenticated client")
            raise ApiError(403, "Changes are refused: no api.token_file is set and "
                                "api.allow_unauthenticated is false.")
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "This request needs an 'Authorization: Bearer <token>' header.")
        if not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            raise ApiError(401, "The token is wrong.")
        return Caller(None, "token")
