"""What a job or a script imports to talk to a daemon: the REST client (`ApiClient`),
and `Job` and `DistributedCheckpoint` for jobs that hold themselves."""

from governor.client.cooperative import Decision, DistributedCheckpoint, Job
from governor.client.rest import ApiClient, ClientError, daemon_url, read_token, tls_context

__all__ = ["ApiClient", "ClientError", "Decision", "DistributedCheckpoint", "Job",
           "daemon_url", "read_token", "tls_context"]
