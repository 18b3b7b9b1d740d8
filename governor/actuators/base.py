"""The interface every job actuator implements.

The controller calls `apply` for every job every round with the job's directive; an
actuator makes that idempotent and cheap when nothing changed, and re-asserts its hold
when something has (a child forked into a stopped tree, a cgroup thawed by someone
else). Each records its hold in the journal before it acts and drops it after it has
undone it, so `governor release-all` can undo whatever is left if the daemon dies.
"""

from __future__ import annotations

from typing import Any, Protocol

from governor.host import procfs
from governor.jobs.model import Directive, Job, Mode


class ActuatorError(Exception):
    """This job cannot be held this way; the message is one sentence for the caller."""


class ProtectedProcessError(ActuatorError):
    """This job cannot be held because it holds a process that must never be held (init,
    the governor, one of its ancestors, a kernel thread)."""


class Actuator(Protocol):
    mode: Mode

    def attach(self, job: Job) -> None:
        """Take the job in at registration (cgroup mode moves a pid's tree into a cgroup of
        its own and sets job.cgroup). Raises ActuatorError if the job cannot be held."""
        ...

    def apply(self, job: Job, directive: Directive) -> None:
        """Bring the job to the directive: full speed, slowed to directive.speed, or paused.
        Idempotent. The hold is in the journal before this returns."""
        ...

    def detach(self, job: Job) -> None:
        """Back to full speed and undo what attach did (restore the original cgroup).
        Never raises: a job that is already gone is simply forgotten."""
        ...

    def close(self) -> None:
        """Stop background threads. Releasing jobs is the controller's business."""
        ...


def never_held(pid: int) -> bool:
    """A process never stopped or frozen, whatever cgroup it shares with a job: Slurm's
    step daemon sits in the job's cgroup (cgroup v1) or below it (v2), and a stopped one
    hangs every Slurm request about the job (scontrol listpids, scancel, suspend itself).
    Told by its executable and uid, never by its name, which any process may take."""
    return procfs.is_slurmstepd(pid)


def hold_key(job: Job) -> str:
    return f"{job.mode.value}:{job.id}"


JournalEntry = dict[str, Any]
