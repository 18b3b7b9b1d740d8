"""What a failed request raises, apart from the REST client, so the `governor` command can
catch it without importing httpx (the daemon, started by the same command, never needs it)."""

from __future__ import annotations


class ClientError(Exception):
    """A request failed; the message is one sentence for the user."""

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)
