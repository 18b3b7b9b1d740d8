"""The Host header check against DNS rebinding.

A web page from evil.example can make a browser on this machine resolve evil.example to
127.0.0.1 and talk to the daemon as its own origin; the browser then still sends
`Host: evil.example`, and that is what is refused. It is Starlette's
TrustedHostMiddleware, answering in the API's `{"error": ...}` shape, with two
exceptions: a Host that is an IP address (rebinding needs a name) and requests over the
unix socket (no browser reaches it).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from governor.api.auth import PEER_UID
from governor.api.errors import error_response

#: the Host the CLI sends over the unix socket, and a name containers give the daemon
SERVICE_NAME = "governor"


def default_allowed_hosts(listen_host: str) -> list[str]:
    """This machine's names: localhost, its loopback addresses, the listen host, the host
    name and FQDN, and "governor"."""
    names = ["localhost", "127.0.0.1", "::1", listen_host, SERVICE_NAME]
    try:
        names.append(socket.gethostname())
        names.append(socket.getfqdn())
    except OSError:
        pass
    return names


def host_of(header: str) -> str:
    """"example.com" from "Example.COM.:8080", "::1" from "[::1]:9474"."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostCheck:
    """ASGI middleware: a request whose Host names no allowed host gets 400 {"error"}."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]):
        self.app = app
        patterns = {host_of(a) if a != "*" else "*" for a in allowed if a.strip()}
        self.any = "*" in patterns
        self.exact = {p for p in patterns if not p.startswith("*.")}
        self.suffixes = tuple(p[1:] for p in patterns if p.startswith("*."))

    def allows(self, header: str) -> bool:
        host = host_of(header)
        if not host:
            return False
        return (self.any or host in self.exact or host.endswith(self.suffixes)
                or _is_address(host))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.any:
            await self.app(scope, receive, send)
            return
        if PEER_UID in scope:  # the unix socket: set from SO_PEERCRED, never from a client
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        if self.allows(header):
            await self.app(scope, receive, send)
            return
        if header:
            message = (f"The Host header {header[:100]!r} names no host this daemon answers "
                       "for (api.allowed_hosts).")
        else:
            message = "The request has no Host header."
        response = error_response(400, message)
        await response(scope, receive, send)
