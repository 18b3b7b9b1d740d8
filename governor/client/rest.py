"""Talking to a running daemon over its REST API (the CLI, and jobs that hold themselves:
`Job`, `DistributedCheckpoint`, from governor.client.cooperative).

The client finds the daemon and its token through the same config file as the daemon
(read by `ClientSettings`, from governor.client.settings): the unix socket when one is
configured and reachable (the kernel then vouches for the caller's uid, no token
needed), else TCP with the token from `api.token_file`, over https when the daemon
serves TLS (verified against `api.tls_ca`, else the daemon's own certificate, which is
how a self-signed one is trusted). Only httpx and the standard library: a job imports
this without the daemon's dependencies.
"""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from governor.client.errors import ClientError
from governor.client.settings import ClientSettings

__all__ = ["ApiClient", "ClientError", "daemon_url", "read_token", "tls_context"]


def daemon_url(settings: ClientSettings) -> str:
    return settings.url


def tls_context(settings: ClientSettings) -> ssl.SSLContext:
    """Trust what the daemon's certificate is signed by: api.tls_ca, else the certificate
    itself (a self-signed one)."""
    cafile = settings.tls_ca or settings.tls_cert
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        key = "api.tls_ca" if settings.tls_ca else "api.tls_cert"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ClientError(f"cannot use {cafile} ({key}) to verify the governor: "
                          f"{reason}") from None


def read_token(settings: ClientSettings) -> str | None:
    path = settings.token_file
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except FileNotFoundError:
        return None
    except PermissionError:
        raise ClientError(f"cannot read the token in {path}: permission denied (run as the "
                          "daemon's user or root, or use the unix socket)") from None


def _tls_failure(exc: BaseException) -> str | None:
    """The reason, when a connection failed in the TLS handshake rather than not at all."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return str(seen.reason or seen)
        seen = seen.__cause__ or seen.__context__
    return None


class ApiClient:
    """The REST API, one method per route. `settings`: where the daemon is, from
    `ClientSettings.find(path)` (a job) or the daemon's own config (the CLI)."""

    def __init__(self, settings: ClientSettings, *, timeout: float = 10.0):
        self.settings = settings
        socket_path = settings.socket
        #: the daemon's TCP address, which is what jobs are told (GOVERNOR_URL)
        self.url = settings.url
        self.socket: str | None = None
        if socket_path and os.path.exists(socket_path):
            transport = httpx.HTTPTransport(uds=socket_path)
            self.where = self.socket = socket_path
            base_url = "http://governor"
        else:
            transport = httpx.HTTPTransport(
                verify=tls_context(settings) if settings.tls else True)
            base_url = self.where = self.url
        self._http = httpx.Client(base_url=base_url, transport=transport, timeout=timeout)

    def _auth(self) -> dict[str, str]:
        """The token header for a change; read only then, so any user can read status.
        Over the unix socket the kernel vouches for the caller instead."""
        if self.socket is not None:
            return {}
        token = os.environ.get("GOVERNOR_TOKEN") or read_token(self.settings)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _auth_if_any(self) -> dict[str, str]:
        """The token header where this client may read the token: a directive poll with
        it keeps the job alive and carries its progress, and without it is a plain read."""
        try:
            return self._auth()
        except ClientError:
            return {}

    def _credentials(self) -> str:
        """Which config and token this client used, for a refused token: the usual cause
        is a CLI that found another config than the daemon's."""
        config = self.settings.config_file or "none (built-in defaults)"
        if os.environ.get("GOVERNOR_TOKEN"):
            token = "$GOVERNOR_TOKEN"
        else:
            token = self.settings.token_file or "none"
        return (f"(config: {config}; token file: {token}; point the CLI at the daemon's "
                "config with --config or GOVERNOR_CONFIG)")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, timeout: float | None = None,
                **kwargs: Any) -> Any:
        if method != "GET":
            kwargs["headers"] = {**kwargs.get("headers", {}), **self._auth()}
        try:
            if timeout is not None:
                kwargs["timeout"] = timeout
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            tls = _tls_failure(exc)
            if tls is not None:
                raise ClientError(f"TLS with the governor at {self.where} failed: {tls} "
                                  "(check api.tls_ca and api.tls_cert)") from None
            raise ClientError(f"cannot reach the governor at {self.where} "
                              "(is `governor run` running?)") from None
        except httpx.TimeoutException:
            raise ClientError(f"the governor at {self.where} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise ClientError(f"talking to the governor at {self.where}: {exc}") from None
        if response.status_code == 204:
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            message = body.get("error") if isinstance(body, dict) else None
            message = message or f"HTTP {response.status_code}"
            if response.status_code == 401:
                message = f"{message} {self._credentials()}"
            raise ClientError(message, response.status_code)
        return body

    # ---- the REST API, one method per route ----

    def status(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/status"))

    def jobs(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/jobs"))

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/jobs/{job_id}"))

    def register(self, name: str, *, pid: int | None = None, cgroup: str | None = None,
                 mode: str | None = None, devices: list[str] | None = None,
                 priority: int = 0, source: str | None = None,
                 scheduler_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "devices": devices or [], "priority": priority}
        for key, value in (("pid", pid), ("cgroup", cgroup), ("mode", mode),
                           ("source", source), ("scheduler_id", scheduler_id)):
            if value is not None:
                body[key] = value
        return dict(self.request("POST", "/v1/jobs", json=body))

    def unregister(self, job_id: str) -> None:
        self.request("DELETE", f"/v1/jobs/{job_id}")

    def pause(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/jobs/{job_id}/pause"))

    def resume(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/jobs/{job_id}/resume"))

    def directive(self, job_id: str, *, wait: float = 0, since: int | None = None,
                  progress: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """`progress`: totals a cooperative job reports with the poll (steps,
        step_seconds, step_buckets, deferrals; see governor.client.progress)."""
        params: dict[str, Any] = {"wait": wait, **(progress or {})}
        if since is not None:
            params["since"] = since
        return dict(self.request("GET", f"/v1/jobs/{job_id}/directive", params=params,
                                 timeout=wait + 10, headers=self._auth_if_any()))

    def rules(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/rules"))

    def reload(self) -> dict[str, Any]:
        return dict(self.request("POST", "/v1/reload"))

    def events(self, since: float = 0.0, limit: int = 1000) -> list[dict[str, Any]]:
        body = self.request("GET", "/v1/events", params={"since": since, "limit": limit})
        return list(body["events"])

    def all_events(self, since: float = 0.0, page: int = 1000) -> list[dict[str, Any]]:
        """Every event after `since`, a page at a time. A page ends on an event's time, and
        the next asks from just before it: events sharing that time are kept, once."""
        found: list[dict[str, Any]] = []
        seen: set[tuple[float, int]] = set()
        while True:
            batch = self.events(since, page)
            fresh = [e for e in batch if (e["time"], e["seq"]) not in seen]
            found += fresh
            if len(batch) < page or not fresh:
                return found
            last = batch[-1]["time"]
            seen = {(e["time"], e["seq"]) for e in batch if e["time"] == last}
            since = math.nextafter(last, -math.inf)
