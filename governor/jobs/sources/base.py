"""What a job source is: something on the node that knows which jobs run there.

The REST API is the source every job had so far (`"api"`, and `"launch"` for
`governor launch`): it pushes registrations. A scheduler's source is polled instead: once
a round, before the round's snapshot is evaluated, the daemon asks each source what
started and what ended since the last poll, and registers or unregisters those jobs
itself. A poll must be cheap when nothing changed (a directory listing, not a fork),
because it runs every round on every node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from governor.jobs.registry import JobRequest


@dataclass(frozen=True, slots=True)
class Changes:
    """What a poll found: jobs to register, and the scheduler ids of jobs that ended."""

    started: tuple[JobRequest, ...] = ()
    ended: tuple[str, ...] = ()
    #: why a job seen could not be made into a request yet (asked for again later)
    problems: tuple[str, ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.started or self.ended or self.problems)


NOTHING = Changes()


class JobSource(Protocol):
    #: the value of a job's "source" field: "slurm", "kubernetes"
    name: str

    def poll(self) -> Changes:
        """What started and ended since the last poll. Never raises for a scheduler that
        is down: that is a problem to report, and the jobs it knew are kept."""
        ...

    def close(self) -> None: ...
