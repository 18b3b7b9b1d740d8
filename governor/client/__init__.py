"""What a job or a script imports to talk to a daemon: the REST client (`ApiClient`),
where to find the daemon (`ClientSettings`), and `Job` and `DistributedCheckpoint` for
jobs that hold themselves. Only httpx and the standard library: none of the daemon's
dependencies (tests/test_client_imports.py proves it)."""

from governor.client.cooperative import Decision, DistributedCheckpoint, Job
from governor.client.rest import ApiClient, ClientError, daemon_url, read_token, tls_context
from governor.client.settings import ClientSettings, SettingsError

__all__ = ["ApiClient", "ClientError", "ClientSettings", "Decision", "DistributedCheckpoint",
           "Job", "SettingsError", "daemon_url", "read_token", "tls_context"]
