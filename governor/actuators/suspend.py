"""Suspend mode: a Slurm job is paused by `scontrol suspend` and let go by `scontrol resume`.

Slurm stops the job on every node at once, so no rank waits in a collective on a
stopped peer, `squeue` shows S, and the suspended time is not charged to the job's time
limit. Slurm has no slow: a slow is this node's duty cycle, by the signal actuator, as
for any job.

What governor suspended is in the journal before `scontrol suspend` is sent, under the
hold kind "suspend", so the guardian and `governor release-all` resume it, and only it:
a job already suspended when governor would pause it (by an administrator, or by
another node's governor) is left as it is, and not resumed later.

Slurm is asked on the actuator's own worker thread, never under the controller's lock
(see SuspendActuator): a slurmctld that is down or hung is a problem reported on its own
jobs, while every other job and the power caps are enforced each round as ever.

An administrator may `scontrol resume` a job governor holds. Once the job's processes
on this node were seen suspended, seeing them run again means someone continued them,
and the worker asks Slurm who. If Slurm no longer says SUSPENDED, an administrator
resumed it: the hold is dropped from the journal, reported (audited and counted) and not
fought; the job is not suspended again until its directive lets it go and pauses it
anew. Until then the job is marked resumed outside governor (`Job.outside`), so
/v1/jobs, the CLI and the metrics say it runs, while its directive (what cooperative
clients read) stays the pause.

If Slurm still says SUSPENDED, someone else continued the processes: under
proctrack/linuxproc or pgid Slurm suspends by SIGSTOP, which the job's user may undo with
SIGCONT. That is not a resume, and governor stops them again, with the slower's signal
hold (SIGSTOP, journalled under the kind "signal" before it is sent, so the guardian and
`release-all` continue what it stopped). Slurm cannot be asked instead: it refuses to
suspend a job it holds suspended. It is logged and reported (`outside-continue`) once a
pause; the signal hold stays until the pause ends, or until Slurm says that an
administrator resumed the job after all (the processes seen running again are asked about
each time).
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
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
    #: governor's `scontrol suspend` is in place (as the worker last reported)
    suspended: bool = False
    #: its processes were seen suspended since then
    seen_suspended: bool = False
    #: someone else resumed it during this pause: not suspended again until it ends (the
    #: job shows it as `Job.outside`, "resumed")
    yielded: bool = False
    #: its processes were continued while Slurm still held it suspended (a user's SIGCONT
    #: under proctrack/linuxproc): the slower stops them until the pause ends
    restopped: bool = False
    #: it was already suspended by someone else when this pause began
    foreign: bool = False
    #: a call to Slurm for it is queued or running on the worker
    busy: bool = False
    #: why the last call to Slurm failed, until one succeeds
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Call:
    """One call to Slurm for the worker: "suspend" or "resume" a job, or "check" whether
    Slurm still holds it suspended."""

    what: str
    job_id: str
    key: str
    scheduler_id: str
    #: for a job already let go: its outcome is logged, not kept for a later round
    detached: bool = False


@dataclass(frozen=True, slots=True)
class _Outcome:
    #: "suspended", "foreign", "gone", "resumed", "error", or a check's answer:
    #: "still-suspended" or "not-suspended"
    what: str
    detail: str = ""


class SuspendActuator:
    """Slurm is asked on a worker thread of this actuator's own, never on the controller's:
    `apply` queues a call and takes its outcome on a later round, so a slurmctld that is
    down or hung delays only its own jobs (each reported with the error), never the round,
    the other jobs or the power caps. The worker journals the hold before it sends
    `scontrol suspend`, and resumes only a job whose hold the journal holds."""

    mode = Mode.SUSPEND

    def __init__(self, journal: Journal, slower: Actuator, *, site: host.SlurmSite,
                 report: Report = _no_report):
        self._journal = journal
        self._slower = slower
        self._site = site
        self._report = report
        self._states: dict[str, _State] = {}
        self._calls: queue.Queue[_Call | None] = queue.Queue()
        self._outcomes: dict[str, _Outcome] = {}
        self._outcomes_lock = threading.Lock()
        self._worker: threading.Thread | None = None

    # ---- the Actuator protocol ----

    def attach(self, job: Job) -> None:
        if not job.scheduler_id or job.source != "slurm":
            raise ActuatorError("suspend mode holds Slurm jobs only (a job with a Slurm job id)")
        self._states.setdefault(job.id, _State())
        self._slower.attach(job)

    def apply(self, job: Job, directive: Directive) -> None:
        state = self._states.setdefault(job.id, _State())
        self._take_outcome(job, state)
        pause = directive.action is Action.PAUSE or (
            directive.action is Action.SLOW and directive.speed <= 0.0)
        if pause:
            if state.suspended:
                self._watch(job, state)
            # stopped by signals too only while Slurm holds it suspended and someone else
            # continued it
            self._slower.apply(job, directive if state.restopped else RUN)
            if not state.suspended and not (state.yielded or state.foreign or state.busy):
                self._submit(job, state, "suspend")
        else:
            state.yielded = state.foreign = state.restopped = False
            job.outside = None
            if state.suspended and not state.busy:
                self._submit(job, state, "resume")
            elif not state.suspended and not state.busy:
                state.error = None  # nothing asked of Slurm: no failure stands
            self._slower.apply(job, directive)
        if state.error is not None:
            raise ActuatorError(state.error)

    def detach(self, job: Job) -> None:
        state = self._states.pop(job.id, None)
        job.outside = None
        if state is not None and (state.suspended or state.busy):
            # resumed by the worker if, and only if, governor's hold is in the journal
            self._queue(_Call("resume", job.id, key(job), str(job.scheduler_id),
                              detached=True))
        self._slower.detach(job)

    def close(self) -> None:
        """Send what is queued (the resumes of a shutdown), then stop the worker."""
        worker = self._worker
        if worker is not None:
            self._calls.put(None)
            worker.join(timeout=3 * host.SCONTROL_TIMEOUT)
            if worker.is_alive():
                log.warning("scontrol calls still pending at exit; release-all resumes what "
                            "governor suspended")
        self._slower.close()

    # ---- on the controller's thread ----

    def _submit(self, job: Job, state: _State, what: str) -> None:
        state.busy = True
        self._queue(_Call(what, job.id, key(job), str(job.scheduler_id)))

    def _queue(self, call: _Call) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="scontrol", daemon=True)
            self._worker.start()
        self._calls.put(call)

    def _take_outcome(self, job: Job, state: _State) -> None:
        with self._outcomes_lock:
            outcome = self._outcomes.pop(job.id, None)
        if outcome is None:
            return
        state.busy = False
        if outcome.what == "error":
            state.error = outcome.detail
            return
        state.error = None
        if outcome.what == "suspended":
            state.suspended, state.seen_suspended = True, False
            log.info("job %s: Slurm job %s suspended", job.id, job.scheduler_id)
        elif outcome.what == "resumed":
            state.suspended = False
            log.info("job %s: Slurm job %s resumed", job.id, job.scheduler_id)
        elif outcome.what == "foreign":
            state.foreign = True
            log.info("job %s: Slurm job %s is already suspended by someone else; left "
                     "alone", job.id, job.scheduler_id)
        elif outcome.what == "not-suspended" and state.suspended:
            self._yield(job, state)
        elif outcome.what == "still-suspended" and state.suspended and not state.restopped:
            # seen_suspended stays: processes seen running after this answer (an
            # administrator's resume since) are asked about anew
            state.restopped = True
            log.warning("job %s: the processes of Slurm job %s were continued by someone "
                        "other than Slurm, which still holds it suspended; stopped again "
                        "until this pause ends", job.id, job.scheduler_id)
            self._report(job, "outside-continue")

    def _watch(self, job: Job, state: _State) -> None:
        """Notice processes running that Slurm suspended, on this node, and ask Slurm
        whether it resumed them (an administrator) or not (someone's SIGCONT)."""
        seen = suspended_here(job)
        if seen is None:
            return
        if seen:
            state.seen_suspended = True
            return
        if state.seen_suspended and not state.busy:
            self._submit(job, state, "check")

    def _yield(self, job: Job, state: _State) -> None:
        """Someone resumed the job through Slurm: let it run until this pause ends."""
        state.suspended, state.yielded, state.restopped = False, True, False
        job.outside = "resumed"
        self._drop(key(job), job.id)
        log.warning("job %s: Slurm job %s was resumed by someone else while governor held "
                    "it; not suspended again until this pause ends", job.id, job.scheduler_id)
        self._report(job, "outside-resume")

    # ---- on the worker's thread ----

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                outcome = (self._suspend(call) if call.what == "suspend"
                           else self._check(call) if call.what == "check"
                           else self._resume(call))
            except Exception as exc:  # the worker must outlive any one call
                outcome = _Outcome("error", f"scontrol {call.what} {call.scheduler_id} "
                                            f"failed: {exc!r}")
            if call.detached:
                if outcome.what == "error":
                    log.warning("job %s: could not resume it on detach: %s", call.job_id,
                                outcome.detail)
                continue
            with self._outcomes_lock:
                self._outcomes[call.job_id] = outcome

    def _ask(self, call: _Call) -> host.SlurmJob | _Outcome:
        """What Slurm says of the call's job; the outcome instead when it cannot be
        asked ("error") or no longer knows the job ("gone")."""
        try:
            found = host.show_job(self._site, call.scheduler_id)
        except host.SlurmError as exc:
            return _Outcome("error", f"Slurm cannot be asked about job {call.scheduler_id}: "
                                     f"{exc}")
        return _Outcome("gone") if found is None else found

    def _suspend(self, call: _Call) -> _Outcome:
        found = self._ask(call)
        if isinstance(found, _Outcome):
            return found
        if found.state == "SUSPENDED":
            return _Outcome("foreign")
        try:
            self._journal.put_hold(call.key, {"kind": "suspend", "job": call.job_id,
                                              "scheduler_id": call.scheduler_id,
                                              "conf": self._site.conf})
        except OSError as exc:
            return _Outcome("error", f"cannot write the journal: {exc}")
        try:
            host.run_scontrol(self._site, "suspend", call.scheduler_id)
        except host.SlurmError as exc:
            self._drop(call.key, call.job_id)
            return _Outcome("error", f"scontrol suspend {call.scheduler_id} failed: {exc}")
        return _Outcome("suspended")

    def _check(self, call: _Call) -> _Outcome:
        found = self._ask(call)
        if isinstance(found, _Outcome):
            return found
        return _Outcome("still-suspended" if found.state == "SUSPENDED" else "not-suspended")

    def _resume(self, call: _Call) -> _Outcome:
        if call.key not in self._journal.holds():
            return _Outcome("resumed")  # not governor's suspend (or already let go)
        try:
            host.run_scontrol(self._site, "resume", call.scheduler_id)
        except host.SlurmError as exc:
            if not host.already(exc, "resume"):
                return _Outcome("error", f"scontrol resume {call.scheduler_id} failed: {exc}")
        self._drop(call.key, call.job_id)
        return _Outcome("resumed")

    def _drop(self, hold: str, job_id: str) -> None:
        try:
            self._journal.drop_hold(hold)
        except OSError as exc:
            log.warning("job %s: cannot drop its hold from the journal: %s", job_id, exc)


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
