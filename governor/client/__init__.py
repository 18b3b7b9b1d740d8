"""What a job or a script imports to talk to a daemon: the REST client (`ApiClient`),
where to find the daemon (`ClientSettings`), and `Job` and `DistributedCheckpoint` for
jobs that hold themselves. Only httpx and the standard library: none of the daemon's
dependencies (tests/test_client_imports.py proves it).

The names are imported when first used: the daemon reads two of this package's
standard-library modules (`progress`, the wire format of a job's progress, and
`settings`, the defaults the config shares), and importing the package for them must not
bring httpx in (tests/test_memory.py checks what the running daemon imports)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from governor.client.cooperative import Decision, DistributedCheckpoint, Job
    from governor.client.errors import ClientError
    from governor.client.rest import ApiClient, daemon_url, read_token, tls_context
    from governor.client.settings import ClientSettings, SettingsError

#: each name this package offers, and the module it comes from
_FROM = {
    "ApiClient": "rest", "daemon_url": "rest", "read_token": "rest", "tls_context": "rest",
    "ClientError": "errors",
    "ClientSettings": "settings", "SettingsError": "settings",
    "Decision": "cooperative", "DistributedCheckpoint": "cooperative", "Job": "cooperative",
}

__all__ = ["ApiClient", "ClientError", "ClientSettings", "Decision", "DistributedCheckpoint",
           "Job", "SettingsError", "daemon_url", "read_token", "tls_context"]


def __getattr__(name: str) -> Any:
    module = _FROM.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
