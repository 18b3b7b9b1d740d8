"""Why a request about a job is refused, by kind.

Each kind is a class; the message is one sentence for the caller. What a kind means to a
protocol (the HTTP status of the REST API, and the `status` of an audit log's
"<what>-refused" event) is decided in governor/api/errors.py alone.
"""

from __future__ import annotations


class RegistrationError(Exception):
    """A registration, unregistration or operator request refused."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


class NoSuchJob(RegistrationError):
    """No job has the id asked for."""


class NotPermitted(RegistrationError):
    """The caller may not do this: a protected process (pid 1, the governor, its
    ancestors, a kernel thread), another user's process or job, cgroups without root."""


class Conflict(RegistrationError):
    """The request clashes with what is: already registered, a reused pid, a job that
    exited."""


class Unacceptable(RegistrationError):
    """The request cannot be carried out as asked: a bad name or device, no such process,
    a mode that cannot hold the job or is not available here."""


class OverQuota(RegistrationError):
    """The caller has as many jobs registered as one user may (jobs.max_per_user): each
    job costs the daemon memory and work every round, so one user cannot take it all."""


class NotRecorded(RegistrationError):
    """The job was not registered: the journal could not be written."""
