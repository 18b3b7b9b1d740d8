"""Suspend mode: a Slurm job is paused by `scontrol suspend` and let go by `scontrol resume`.

Slurm stops the job on every node at once, so no rank waits in a collective on a
stopped peer, `squeue` shows S, and the suspended time is not charged to the job's time
limit. Slurm has no slow: a slow is this node's duty cycle, by the signal actuator, as
for any job.

What governor suspended is in the journal before `scontrol suspend` is sent, under the
hold kind "suspend", so the guardian and `governor release-all` resume it, and only it:
a job already suspended when governor would pause it (by an administrator, or by
another node's governor) is left as it is, and not resumed later.

An administrator may `scontrol resume` a job governor holds. Once the job's processes
on this node were seen suspended, seeing them run again means someone resumed it: the
hold is dropped from the journal, reported (audited and counted) and not fought; the job
is not suspended again until its directive lets it go and pauses it anew.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from governor.actuators.base import Actuator, ActuatorError, JournalEntry, never_held
from governor.host import cgroupfs, procfs
from governor.host import slurm as host
from governor.jobs.model import RUN, Action, Directive, Job, Mode
from governor.safety.journal import Journal

if TYPE_CHECKING:
    from governor.actuators.modes import ModeContext

log = logging.getLogger(__name__)

#: process states of a suspended job: stopped (signals) or frozen (proctrack/cgroup
#: freezes after SIGTSTP, and a frozen task shows D)
SUSPENDED_STATES = frozenset({b"T", b"t", b"D"})
#: states that say nothing either way: gone, zombie, dead
NEUTRAL_STATES = frozenset({b"", b"Z", b"X"})

#: (job, what happened): told of a resume governor did not make
Report = Callable[[Job, str], None]


def _no_report(_job: Job, _what: str) -> None:
    return None


@dataclass
class _State:
    #: governor sent `scontrol suspend` and has not resumed it
    suspended: bool = False
    #: its processes were seen suspended since then
    seen_suspended: bool = False
    #: someone else resumed it during this pause: not suspended again until it ends
    yielded: bool = False
    #: it was already suspended by someone else when this pause began
    foreign: bool = False


class SuspendActuator:
    mode = Mode.SUSPEND

    def __init__(self, journal: Journal, slower: Actuator, *, site: host.SlurmSite,
                 report: Report = _no_report):
        self._journal = journal
        self._slower = slower
        self._site = site
        self._report = report
        self._states: dict[str, _State] = {}

    # ---- the Actuator protocol ----

    def attach(self, job: Job) -> None:
        if not job.scheduler_id or job.source != "slurm":
            raise ActuatorError("suspend mode holds Slurm jobs only (a job with a Slurm job id)")
        self._states.setdefault(job.id, _State())
        self._slower.attach(job)

    def apply(self, job: Job, directive: Directive) -> None:
        state = self._states.setdefault(job.id, _State())
        pause = directive.action is Action.PAUSE or (
            directive.action is Action.SLOW and directive.speed <= 0.0)
        if pause:
            self._slower.apply(job, RUN)
            self._pause(job, state)
            return
        state.yielded = state.foreign = False
        if state.suspended:
            self._resume(job, state)
        self._slower.apply(job, directive)

    def detach(self, job: Job) -> None:
        state = self._states.pop(job.id, None)
        try:
            if state is not None and state.suspended:
                self._resume(job, state)
        except ActuatorError as exc:
            log.warning("job %s: could not resume it on detach: %s", job.id, exc)
        self._slower.detach(job)

    def close(self) -> None:
        self._slower.close()

    # ---- holding ----

    def _pause(self, job: Job, state: _State) -> None:
        if state.suspended:
            self._watch(job, state)
            return
        if state.yielded or state.foreign:
            return
        scheduler_id = str(job.scheduler_id)
        found = host.show_job(self._site, scheduler_id)
        if found is None:
            return
        if found.state == "SUSPENDED":
            state.foreign = True
            log.info("job %s: Slurm job %s is already suspended by someone else; left "
                     "alone", job.id, scheduler_id)
            return
        try:
            self._journal.put_hold(key(job), {"kind": "suspend", "job": job.id,
                                               "scheduler_id": scheduler_id,
                                               "conf": self._site.conf})
        except OSError as exc:
            raise ActuatorError(f"cannot write the journal: {exc}") from exc
        try:
            host.run_scontrol(self._site, "suspend", scheduler_id)
        except host.SlurmError as exc:
            self._drop(job)
            raise ActuatorError(f"scontrol suspend {scheduler_id} failed: {exc}") from exc
        state.suspended, state.seen_suspended = True, False
        log.info("job %s: Slurm job %s suspended", job.id, scheduler_id)

    def _resume(self, job: Job, state: _State) -> None:
        scheduler_id = str(job.scheduler_id)
        try:
            host.run_scontrol(self._site, "resume", scheduler_id)
        except host.SlurmError as exc:
            if not host.already(exc, "resume"):
                raise ActuatorError(f"scontrol resume {scheduler_id} failed: {exc}") from exc
        state.suspended = False
        self._drop(job)
        log.info("job %s: Slurm job %s resumed", job.id, scheduler_id)

    def _watch(self, job: Job, state: _State) -> None:
        """Notice a resume governor did not make, from this node's processes."""
        seen = suspended_here(job)
        if seen is None:
            return
        if seen:
            state.seen_suspended = True
            return
        if not state.seen_suspended:
            return  # still on its way to being suspended
        state.suspended, state.yielded = False, True
        self._drop(job)
        log.warning("job %s: Slurm job %s was resumed by someone else while governor held "
                    "it; not suspended again until this pause ends", job.id, job.scheduler_id)
        self._report(job, "outside-resume")

    def _drop(self, job: Job) -> None:
        try:
            self._journal.drop_hold(key(job))
        except OSError as exc:
            log.warning("job %s: cannot drop its hold from the journal: %s", job.id, exc)


def key(job: Job) -> str:
    return f"slurm:{job.id}"


def job_pids(job: Job) -> list[int]:
    """The job's processes on this node: its cgroup's subtree (but not slurmstepd, which
    Slurm does not suspend), or its process tree."""
    if job.cgroup:
        return [pid for pid in cgroupfs.subtree_pids(Path(job.cgroup))
                if not never_held(pid)]
    if job.pid is not None:
        return [job.pid, *procfs.descendants(job.pid)]
    return []


def suspended_here(job: Job) -> bool | None:
    """Whether every process of the job on this node is stopped or frozen; None when
    there is none to tell by."""
    states = [procfs.state(pid) for pid in job_pids(job)]
    telling = [s for s in states if s not in NEUTRAL_STATES]
    if not telling:
        return None
    return all(s in SUSPENDED_STATES for s in telling)


def undo_checked(entry: JournalEntry) -> tuple[bool, str]:
    """Resume the Slurm job a suspend hold names, from the entry alone. A job that is no
    longer suspended, or gone, is done. Never raises."""
    job = entry.get("job", "?") if isinstance(entry, dict) else "?"
    try:
        scheduler_id = str(entry["scheduler_id"])
        site = host.SlurmSite(str(entry.get("conf") or ""))
    except (KeyError, TypeError) as exc:
        return True, f"suspend hold of job {job} is malformed ({exc!r}); nothing resumed"
    try:
        host.run_scontrol(site, "resume", scheduler_id)
    except host.SlurmError as exc:
        if host.already(exc, "resume"):
            return True, f"job {job}: Slurm job {scheduler_id} was not suspended ({exc})"
        return False, f"job {job}: scontrol resume {scheduler_id} failed: {exc}"
    except Exception as exc:
        return False, f"job {job}: scontrol resume {scheduler_id} failed: {exc!r}"
    return True, f"job {job}: Slurm job {scheduler_id} resumed"


def from_context(context: ModeContext) -> SuspendActuator:
    """The suspend mode's entry in governor/actuators/modes.py: slows by a signal duty
    cycle of its own. Unavailable where Slurm's scontrol is not installed."""
    from governor.actuators.signal import SignalActuator

    if shutil.which("scontrol") is None:
        raise ActuatorError("scontrol is not installed (Slurm's client)")

    slower = SignalActuator(context.journal, period=context.config.jobs.slow_period,
                            protected=context.protected)
    return SuspendActuator(context.journal, slower,
                           site=host.SlurmSite(context.config.slurm.conf),
                           report=context.report)
