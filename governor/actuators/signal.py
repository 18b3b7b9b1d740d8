"""Holds a job's processes with SIGSTOP and SIGCONT: pause stops them, slow runs them on a
duty cycle, for jobs that neither run in a cgroup of their own nor hold themselves.

A job's processes are found anew each time: its root and the root's living descendants,
or the pids in its cgroup's cgroup.procs. Every signal goes through
`governor.jobs.process.send_signal`, so a pid that now names another process is never hit.

Journal entries, kind "signal", written before any process is stopped and read by
`undo` with no daemon state::

    {"kind": "signal", "job": "<job id>", "state": "stopped" | "slowed",
     "processes": [[pid, started_at], ...]}

`processes` are those this actuator stopped or is about to: never one that was already
stopped (by its user's SIGSTOP or ctrl-Z, or a debugger), so that a release, here or by
the guardian or release-all, continues only what governor stopped.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import psutil

from governor.actuators.base import (
    ActuatorError,
    JournalEntry,
    ProtectedProcessError,
    hold_key,
    never_held,
)
from governor.control.laws import DutyWindow, retarget_duty, steer_duty
from governor.host import procfs
from governor.host.cgroupfs import cgroup2_mount, in_cgroup_mount, subtree_pids
from governor.host.procfs import ancestors, is_kernel_thread
from governor.jobs.model import Action, Directive, Job, Mode
from governor.jobs.process import ProcessIdentity, identify, is_alive, send_signal, tree
from governor.jobs.services import DEFAULT_SERVICES, ProtectedServices
from governor.safety.journal import Journal

if TYPE_CHECKING:
    from governor.actuators.modes import ModeContext

log = logging.getLogger(__name__)

#: rounds of stop-and-look-again before a pause gives up on a tree that keeps forking
STOP_ROUNDS = 5
#: the feedback loop judges the share a slowed job got over windows this long
WINDOW = 0.5
#: weight of the newest toggle in the running mean of how late toggles go out
LATE_WEIGHT = 0.2
#: a new speed this close to the last keeps the feedback window under way
RETARGET_KEEPS_WINDOW = 0.1
#: a stretch of running free shorter than this does not tell the job's free rate
MIN_FREE_SECONDS = 0.5


@dataclass(eq=False)
class _Cycle:
    """A slowed job's place in the duty cycle and its feedback state."""

    target: float
    #: share of each period the job runs; starts at the target, then steered
    fraction: float
    running: bool
    phase_started: float
    window_started: float
    #: the processes listed at the last continue, and their CPU seconds at the last reading
    members: list[ProcessIdentity] = field(default_factory=list)
    cpu: dict[ProcessIdentity, float] = field(default_factory=dict)
    handles: dict[ProcessIdentity, Any] = field(default_factory=dict)
    #: how late stops and continues go out (waking, listing the tree): each is planned early
    #: by as much, so the phases last what the fraction says
    stop_late: float | None = None
    continue_late: float | None = None
    run_time: float = 0.0
    run_cpu: float = 0.0
    window_cpu: float = 0.0
    #: the target jumped: the window under way measured the old one, so it says nothing
    stale_window: bool = False
    #: the cores the job used running free before it was slowed, when measured
    free_rate: float | None = None


@dataclass(eq=False)
class _Held:
    """What the actuator knows of one attached job."""

    job_id: str
    key: str
    root: ProcessIdentity | None
    cgroup_dir: Path | None
    action: Action = Action.RUN
    #: processes this actuator stopped and has not continued yet
    stopped: set[ProcessIdentity] = field(default_factory=set)
    cycle: _Cycle | None = None
    #: pids already reported as not ours to signal, so the log says it once
    denied: set[int] = field(default_factory=set)
    #: hold only processes of this uid (a job a non-root user registered)
    only_uid: int | None = None
    #: since when the job has run free, and its processes' CPU seconds then: what it
    #: uses running free, which is what a speed is a share of (`job_demand`)
    free_since: float | None = None
    free_cpu: float = 0.0
    #: the cores it used over the last stretch it ran free, when long enough to tell
    free_rate: float | None = None


class _Stopped(NamedTuple):
    members: list[ProcessIdentity]
    #: some member was not ours to signal
    denied: bool


class SignalActuator:
    """Pauses and slows process trees by signals; one thread drives every duty cycle."""

    mode = Mode.SIGNAL

    def __init__(self, journal: Journal, *, period: float = 0.1,
                 clock: Callable[[], float] = time.monotonic,
                 protected: Callable[[], Iterable[int]] = tuple,
                 services: ProtectedServices = DEFAULT_SERVICES):
        self._journal = journal
        #: the node's services: never signalled, whatever tree or cgroup holds them
        self._services = services
        self._period = period
        self._clock = clock
        self._wake = threading.Condition()
        self._held: dict[str, _Held] = {}
        self._heap: list[tuple[float, int, _Held, _Cycle]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = False
        #: one item per caller waiting for the lock; the duty-cycle thread lets them in first
        self._queued: list[None] = []
        self._protected = {1, os.getpid(), *ancestors(os.getpid())}
        #: more pids never to touch, asked each time (the guardian, which may be restarted)
        self._also_protected = protected

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The lock, for callers: an overloaded duty cycle must never lock them out."""
        self._queued.append(None)
        try:
            self._wake.acquire()
        finally:
            self._queued.pop()
        try:
            yield
        finally:
            self._wake.release()

    # ---- the Actuator protocol ----

    def attach(self, job: Job) -> None:
        with self._locked():
            if job.id not in self._held:
                held = self._held[job.id] = self._make(job)
                self._start_free(held)

    def apply(self, job: Job, directive: Directive) -> None:
        with self._locked():
            held = self._held.get(job.id)
            if held is None:
                if directive.action is Action.RUN:
                    return
                try:
                    held = self._held[job.id] = self._make(job)
                except ActuatorError as exc:
                    log.info("job %s: nothing to hold: %s", job.id, exc)
                    return
            action, speed = directive.action, directive.speed
            if action is Action.RUN or (action is Action.SLOW and speed >= 1.0):
                if held.action is not Action.RUN or held.stopped:
                    self._release(held)
            elif action is Action.PAUSE or speed <= 0.0:
                self._pause(held)
            else:
                self._slow(held, speed)

    def detach(self, job: Job) -> None:
        try:
            with self._locked():
                held = self._held.pop(job.id, None)
                if held is not None and (held.action is not Action.RUN or held.stopped):
                    self._release(held)
        except Exception:
            log.exception("job %s: could not release it on detach", job.id)

    def close(self) -> None:
        """Stop the duty-cycle thread, leaving every job it cycled running."""
        with self._locked():
            self._closing = True
            self._wake.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        with self._locked():
            self._closing = False
            self._heap.clear()
            for held in self._held.values():
                if held.cycle is not None:
                    try:
                        self._release(held)
                    except Exception:
                        log.exception("job %s: could not continue it on close", held.job_id)

    # ---- the three states ----

    def _pause(self, held: _Held) -> None:
        self._end_free(held)
        held.cycle = None
        result = self._stop(held, "stopped")
        if result.denied and not held.stopped.intersection(result.members):
            self._drop_hold(held)
            held.action = Action.RUN
            raise ActuatorError(f"not allowed to stop the processes of job {held.job_id}")
        if held.action is not Action.PAUSE:
            log.info("job %s paused: %d processes stopped", held.job_id, len(result.members))
        held.action = Action.PAUSE

    def _slow(self, held: _Held, speed: float) -> None:
        cycle = held.cycle
        if cycle is not None:
            if speed != cycle.target:
                cycle.fraction = retarget_duty(cycle.fraction, cycle.target, speed)
                # a small step (a hold rule's loop moves the speed a little every round)
                # leaves the window under way telling how the job responds; a jump does not
                cycle.stale_window = abs(speed - cycle.target) > RETARGET_KEEPS_WINDOW
                cycle.target = speed
            return
        members = self._members(held)
        if not members and not held.stopped:
            return
        if held.action is Action.RUN and members and all(
                self._signal(held, p, 0) is None for p in members):
            raise ActuatorError(f"not allowed to stop the processes of job {held.job_id}")
        self._record(held, "slowed", members)
        self._end_free(held, members)
        now = self._clock()
        running = not held.stopped
        cycle = _Cycle(target=speed, fraction=speed, running=running, phase_started=now,
                       window_started=now, members=members, free_rate=held.free_rate)
        self._cpu_used(cycle, members)
        held.cycle, held.action = cycle, Action.SLOW
        self._schedule(held, cycle, now + speed * self._period if running else now)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run_cycles, name="signal-duty-cycle",
                                            daemon=True)
            self._thread.start()
        log.info("job %s slowed to %.2f: %d processes", held.job_id, speed, len(members))

    def _release(self, held: _Held) -> None:
        held.cycle = None
        members = self._members(held)
        self._continue(held, members)
        self._start_free(held, members)
        self._drop_hold(held)
        if held.action is not Action.RUN:
            log.info("job %s running at full speed", held.job_id)
        held.action = Action.RUN

    # ---- the duty cycle ----

    def _schedule(self, held: _Held, cycle: _Cycle, when: float) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), held, cycle))
        self._wake.notify()

    def _run_cycles(self) -> None:
        with self._wake:
            while not self._closing:
                if not self._heap:
                    self._wake.wait()
                    continue
                when, _, held, cycle = self._heap[0]
                delay = when - self._clock()
                if delay > 0:
                    self._wake.wait(delay)
                    continue
                heapq.heappop(self._heap)
                if held.cycle is not cycle or self._held.get(held.job_id) is not held:
                    continue
                try:
                    self._toggle(held, cycle, when)
                except Exception:
                    log.exception("job %s: duty cycle failed; it runs free for a while",
                                  held.job_id)
                    self._recover(held, cycle)
                while self._queued and not self._closing:
                    self._wake.wait(0.001)

    def _toggle(self, held: _Held, cycle: _Cycle, planned: float) -> None:
        """Stop the members listed at the last continue, or list them anew and continue.
        Listing is the costly part; done while the job is stopped, it takes no CPU from
        it. A child forked while the job runs is stopped from the next period on."""
        if cycle.running:
            stopped_at = self._clock()  # like phase_started, just before the signals
            for ident in cycle.members:
                if not _is_stopped(ident.pid) and self._signal(held, ident, signal.SIGSTOP):
                    held.stopped.add(ident)
            cycle.stop_late = _mean(cycle.stop_late, stopped_at - planned)
            cycle.run_time += stopped_at - cycle.phase_started
            used = self._cpu_used(cycle, cycle.members)
            cycle.run_cpu += used
            cycle.window_cpu += used
            cycle.running = False
            stop_time = (1.0 - cycle.fraction) * self._period
            self._schedule(held, cycle, stopped_at + stop_time - (cycle.continue_late or 0.0))
            return
        cycle.window_cpu += self._cpu_used(cycle, cycle.members)
        now = self._clock()
        if now - cycle.window_started >= WINDOW or cycle.stale_window:
            self._steer(held, cycle, now)
        cycle.members = self._members(held)
        if cycle.members or held.stopped:
            self._record(held, "slowed", cycle.members)
        # timed before the signals: the woken job may take this thread's CPU for a while
        cycle.phase_started = self._clock()
        self._continue(held, ())
        cycle.continue_late = _mean(cycle.continue_late, cycle.phase_started - planned)
        cycle.running = True
        run_time = cycle.fraction * self._period
        self._schedule(held, cycle, cycle.phase_started + run_time - (cycle.stop_late or 0.0))

    def _steer(self, held: _Held, cycle: _Cycle, now: float) -> None:
        """Feed the window to the duty cycle's law (`steer_duty`), then start a new one
        when it is done; a window that measured an old target only starts a new one."""
        if cycle.stale_window:
            cycle.stale_window = False
        else:
            step = steer_duty(cycle.fraction, cycle.target, DutyWindow(
                now - cycle.window_started, cycle.run_time, cycle.run_cpu, cycle.window_cpu,
                cycle.free_rate))
            if step.achieved is not None:
                cycle.fraction = step.fraction
                log.debug("job %s: got %.3f of %.3f (%.2f cores while running); runs %.3f "
                          "now", held.job_id, step.achieved, cycle.target, step.demand,
                          cycle.fraction)
            if not step.close_window:
                return
        cycle.window_started = now
        cycle.run_time = cycle.run_cpu = cycle.window_cpu = 0.0

    def _recover(self, held: _Held, cycle: _Cycle) -> None:
        try:
            self._continue(held, ())
        except Exception:
            log.exception("job %s: could not continue it", held.job_id)
        cycle.running = True
        cycle.phase_started = self._clock()
        self._schedule(held, cycle, cycle.phase_started + 2 * WINDOW)

    def _start_free(self, held: _Held,
                    members: list[ProcessIdentity] | None = None) -> None:
        """The job runs free from now: start measuring what it uses so."""
        held.free_since = self._clock()
        held.free_cpu = _tree_cpu(self._members(held) if members is None else members)

    def _end_free(self, held: _Held, members: list[ProcessIdentity] | None = None) -> None:
        """The job is held from now: what it used running free since `_start_free` is its
        free rate, if it ran free long enough to tell (else the last one stays)."""
        since, held.free_since = held.free_since, None
        if since is None:
            return
        seconds = self._clock() - since
        if seconds >= MIN_FREE_SECONDS:
            used = _tree_cpu(self._members(held) if members is None else members)
            held.free_rate = max(0.0, used - held.free_cpu) / seconds

    def _cpu_used(self, cycle: _Cycle, members: list[ProcessIdentity]) -> float:
        """CPU seconds the members used since the last reading; a newcomer counts whole."""
        used = 0.0
        readings: dict[ProcessIdentity, float] = {}
        handles: dict[ProcessIdentity, Any] = {}
        for ident in members:
            handle = cycle.handles.get(ident) or _handle(ident)
            seconds = _cpu_seconds(handle)
            if seconds is None:
                continue
            used += max(0.0, seconds - cycle.cpu.get(ident, 0.0))
            readings[ident], handles[ident] = seconds, handle
        cycle.cpu, cycle.handles = readings, handles
        return used

    # ---- processes and signals ----

    def _make(self, job: Job) -> _Held:
        if job.pid is not None:
            return _Held(job.id, hold_key(job), root=self._root(job), cgroup_dir=None,
                         only_uid=job.restricted_uid)
        if job.cgroup:
            return _Held(job.id, hold_key(job), root=None, cgroup_dir=_cgroup_dir(job.cgroup),
                         only_uid=job.restricted_uid)
        raise ActuatorError(f"job {job.id} names neither a process nor a cgroup")

    def _root(self, job: Job) -> ProcessIdentity:
        pid = job.pid
        assert pid is not None
        if pid in self._protected or pid in set(self._also_protected()):
            raise ProtectedProcessError(f"pid {pid} is init, the governor or one of its "
                                        "ancestors")
        current = identify(pid)
        if current is None:
            raise ActuatorError(f"process {pid} has exited")
        if job.pid_started_at is not None and current.started_at != job.pid_started_at:
            raise ActuatorError(f"pid {pid} is now another process")
        if not is_alive(current):
            raise ActuatorError(f"process {pid} has exited")
        if is_kernel_thread(pid):
            raise ActuatorError(f"pid {pid} is a kernel thread")
        if (what := self._services.which(pid)) is not None:
            raise ProtectedProcessError(f"pid {pid} is {what}, one of the node's services")
        return current

    def _members(self, held: _Held) -> list[ProcessIdentity]:
        if held.root is not None:
            found = tree(held.root)
        elif held.cgroup_dir is not None:
            found = _cgroup_members(held.cgroup_dir)
        else:
            found = []
        protected = self._protected | set(self._also_protected())
        members = [p for p in found
                   if p.pid not in protected and self._services.which(p.pid) is None]
        if held.only_uid is not None:
            members = [p for p in members if procfs.uid(p.pid) == held.only_uid]
        return members

    def _stop(self, held: _Held, state: str) -> _Stopped:
        """SIGSTOP every member, the root first so that it cannot fork, then look again
        until no member is left running."""
        sent: set[ProcessIdentity] = set()
        members: list[ProcessIdentity] = []
        denied = False
        for _ in range(STOP_ROUNDS):
            members = self._members(held)
            if not members and not held.stopped:
                self._drop_hold(held)
                break
            self._record(held, state, members)
            todo = [p for p in members if p not in sent and not _is_stopped(p.pid)]
            if not todo:
                break
            for ident in todo:
                sent.add(ident)
                done = self._signal(held, ident, signal.SIGSTOP)
                if done:
                    held.stopped.add(ident)
                denied = denied or done is None
        else:
            log.warning("job %s: still forking after %d rounds of SIGSTOP",
                        held.job_id, STOP_ROUNDS)
        if state == "stopped":
            _wait_stopped(sent)
        return _Stopped(members, denied)

    def _continue(self, held: _Held, members: Iterable[ProcessIdentity]) -> None:
        """SIGCONT what this actuator stopped, children first (in the members' order),
        and nothing else: a process someone else stopped stays stopped."""
        targets = list(dict.fromkeys([*(m for m in members if m in held.stopped),
                                      *held.stopped]))
        for ident in reversed(targets):
            self._signal(held, ident, signal.SIGCONT)
        held.stopped.clear()

    def _signal(self, held: _Held, ident: ProcessIdentity, sig: int) -> bool | None:
        """True if sent, False if the process is gone, None if it is not ours to signal."""
        try:
            return send_signal(ident, sig)
        except PermissionError:
            if ident.pid not in held.denied:
                held.denied.add(ident.pid)
                log.warning("job %s: not allowed to signal pid %d, another user's process; "
                            "only a governor running as root can hold it",
                            held.job_id, ident.pid)
            return None
        except OSError as exc:
            log.warning("job %s: cannot signal pid %d: %s", held.job_id, ident.pid, exc)
            return False

    def _record(self, held: _Held, state: str, members: list[ProcessIdentity]) -> None:
        """Journal the processes this actuator stopped and those it may stop next: the
        members not stopped by someone else."""
        ours = {p for p in members if p in held.stopped or not _is_stopped(p.pid)}
        processes = sorted(ours | held.stopped, key=lambda p: (p.pid, p.started_at))
        entry = {"kind": "signal", "job": held.job_id, "state": state,
                 "processes": [p.as_list() for p in processes]}
        try:
            self._journal.put_hold(held.key, entry)
        except OSError as exc:
            raise ActuatorError(f"cannot write the journal: {exc}") from exc

    def _drop_hold(self, held: _Held) -> None:
        try:
            self._journal.drop_hold(held.key)
        except OSError as exc:
            log.warning("job %s: cannot drop its hold from the journal: %s", held.job_id, exc)


def undo(entry: JournalEntry) -> str:
    """Continue every process a signal hold lists (those governor stopped: not their
    descendants, which a stopped process cannot have forked, nor a process stopped by
    someone else), from the entry alone. Idempotent; never raises."""
    return undo_checked(entry)[1]


def undo_checked(entry: JournalEntry) -> tuple[bool, str]:
    """As undo, and whether everything was undone: False when a process could not be
    signalled (release-all then keeps the hold, to try again)."""
    job = entry.get("job", "?") if isinstance(entry, dict) else "?"
    try:
        listed = [ProcessIdentity(int(pid), float(started))
                  for pid, started in entry["processes"]]
    except (KeyError, TypeError, ValueError) as exc:
        return True, f"signal hold of job {job} is malformed ({exc!r}); nothing continued"
    continued: set[ProcessIdentity] = set()
    refused: set[ProcessIdentity] = set()
    gone = 0
    try:
        for ident in listed:
            if ident.pid <= 1 or not is_alive(ident):
                gone += 1
                continue
            if ident in continued or ident in refused:
                continue
            try:
                if send_signal(ident, signal.SIGCONT):
                    continued.add(ident)
                else:
                    gone += 1
            except OSError:
                refused.add(ident)
    except Exception as exc:
        return False, f"job {job}: continued {len(continued)} processes, then failed: {exc!r}"
    text = f"job {job}: continued {len(continued)} processes ({gone} listed ones gone)"
    return not refused, text + (f"; not allowed to signal {len(refused)}" if refused else "")


def _mean(mean: float | None, value: float) -> float:
    return value if mean is None else mean + LATE_WEIGHT * (value - mean)


def _tree_cpu(members: list[ProcessIdentity]) -> float:
    """The CPU seconds the members have used, those that can still be read."""
    return sum(seconds for ident in members
               if (seconds := _cpu_seconds(_handle(ident))) is not None)


def _cpu_seconds(handle: Any) -> float | None:
    """User and system CPU seconds of a process handle; None for no handle, or a process
    that can no longer be read."""
    if handle is None:
        return None
    try:
        times = handle.cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def _handle(ident: ProcessIdentity) -> Any:
    try:
        return psutil.Process(ident.pid) if is_alive(ident) else None
    except psutil.Error:
        return None


#: how long a pause waits for its processes to show as stopped before it answers
STOP_WAIT = 0.5


def _wait_stopped(sent: Iterable[ProcessIdentity]) -> None:
    """SIGSTOP is delivered when the process next runs: wait (bounded) until each shows
    T, so a pause is reported only once it holds."""
    deadline = time.monotonic() + STOP_WAIT
    pending = [p.pid for p in sent]
    while pending and time.monotonic() < deadline:
        pending = [pid for pid in pending if procfs.state(pid) not in (b"T", b"t", b"Z", b"X", b"")]
        if pending:
            time.sleep(0.002)


def _is_stopped(pid: int) -> bool:
    return procfs.state(pid) in (b"T", b"t")


def _cgroup_dir(path: str) -> Path:
    """The cgroup's directory: the path itself, or the path under the cgroup2 mount; only
    a directory in a mounted cgroup file system, since a `cgroup.procs` file anyone could
    write elsewhere would name any process to stop."""
    given = Path(path)
    if given.is_absolute() and (given / "cgroup.procs").is_file():
        if not in_cgroup_mount(given):
            raise ActuatorError(f"{path} is not a cgroup: it lies in no mounted cgroup "
                                "file system")
        return given
    mount = cgroup2_mount()
    if mount is None:
        raise ActuatorError(f"cgroup {path} does not exist and no cgroup2 is mounted")
    found = mount / path.lstrip("/")
    if not (found / "cgroup.procs").is_file():
        raise ActuatorError(f"cgroup {path} does not exist")
    if not in_cgroup_mount(found):
        raise ActuatorError(f"{path} is not a cgroup: it lies in no mounted cgroup file "
                            "system")
    return found


def _cgroup_members(cgroup_dir: Path) -> list[ProcessIdentity]:
    """The processes of the cgroup and of the cgroups below it (a Slurm job's cgroup
    holds its processes in one cgroup per step), but never Slurm's slurmstepd."""
    pids = subtree_pids(cgroup_dir)
    found = (identify(pid) for pid in pids
             if not is_kernel_thread(pid) and not never_held(pid))
    return [ident for ident in found if ident is not None]


def from_context(context: ModeContext) -> SignalActuator:
    """The signal mode's entry in governor/actuators/modes.py."""
    jobs = context.config.jobs
    return SignalActuator(context.journal, period=jobs.slow_period,
                          protected=context.protected,
                          services=ProtectedServices.of(jobs.protected_executables,
                                                        jobs.protected_units))
