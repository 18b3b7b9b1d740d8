"""Holds jobs through cgroups: a freeze pauses them, a CPU quota slows them.

A frozen cgroup also holds every child forked into it later, which signals cannot promise,
and a CFS quota slows a job without the stop-start jitter of a duty cycle. Works on cgroup
v2, v1 (freezer and cpu) and hybrids of both.

Journal entries (kind "cgroup") name the files to undo and the quota to restore, so that
`undo(entry)` can release a job with no daemon:

    {"kind": "cgroup", "job": ID, "freeze": null | {"version": "v2"|"v1", "path": DIR},
     "frozen": BOOL,
     "quota": null | {"version": "v2"|"v1", "path": DIR, "original": "max 100000"|"-1"},
     "moved": {"created": {HIERARCHY: DIR}, "root": PID,
               "processes": [[PID, STARTED, {HIERARCHY: DIR}], ...]}}

"moved" is there for a job named by a pid: the cgroups made for it (`governor-<id>`) and
where each process came from, written before it is moved, and kept while the job is
attached, held or not ("freeze" is null while nothing is held). Undoing it moves every
process left in the created cgroups back where it came from (one forked there since goes
where the job's first process came from), never into the governor's own cgroup: a
process whose original cgroup is gone is left where it is, and said so. Then the empty
created cgroups are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Literal

import psutil

from governor.actuators.base import (
    ActuatorError,
    JournalEntry,
    ProtectedProcessError,
    hold_key,
    never_held,
)
from governor.control.laws import (
    FEEDBACK_PERIODS,
    MIN_QUOTA_US,
    QuotaState,
    learn_demand,
    next_quota,
)
from governor.host.cgroupfs import (
    MOUNTINFO,
    Hierarchy,
    every_hierarchy,
    find_hierarchies,
    memberships,
    process_cgroups,
    tree_of,
)
from governor.host.procfs import ancestors, is_kernel_thread
from governor.jobs.model import Action, Directive, Job, Mode
from governor.jobs.process import ProcessIdentity, identify, is_alive, tree
from governor.jobs.services import DEFAULT_SERVICES, ProtectedServices
from governor.safety.journal import Journal

if TYPE_CHECKING:
    from governor.actuators.modes import ModeContext

#: find_hierarchies and memberships are the tests' way to the host's cgroups
__all__ = ["CgroupActuator", "Hierarchy", "find_hierarchies", "from_context", "memberships",
           "undo", "undo_checked"]

log = logging.getLogger(__name__)

KIND = "cgroup"
#: where the actuator keeps its state of a job in job.extra
EXTRA_KEY = "cgroup_actuator"
FREEZE_FILE = {"v2": "cgroup.freeze", "v1": "freezer.state"}
#: (frozen, thawed) values of FREEZE_FILE
FREEZE_VALUES = {"v2": ("1", "0"), "v1": ("FROZEN", "THAWED")}
QUOTA_FILE = {"v2": "cpu.max", "v1": "cpu.cfs_quota_us"}
V1_UNLIMITED = "-1"
#: rounds of moving a process tree before giving up on one that forks faster
MOVE_ROUNDS = 50
RMDIR_TRIES = 40
POLL_S = 0.01
JOB_ID = re.compile(r"[A-Za-z0-9_.-]+")
#: the name of a cgroup made for a job: the only kind undo moves processes out of
JOB_DIR = re.compile(r"governor-[A-Za-z0-9_.-]+")


def undo(entry: JournalEntry) -> str:
    """Release a hold from its journal entry alone, as `governor release-all` does with no
    daemon: thaw the cgroup and restore its quota. Idempotent; never raises."""
    return undo_checked(entry)[1]


def undo_checked(entry: JournalEntry) -> tuple[bool, str]:
    """As undo, and whether everything was undone (else release-all keeps the hold)."""
    try:
        ok, done = _undo(entry)
        moved = entry.get("moved")
        if isinstance(moved, dict):
            returned, lines = _return_moved(moved)
            ok &= returned
            done += lines
        return ok, (f"cgroup hold of job {entry.get('job')}: "
                    + ("; ".join(done) or "nothing to undo"))
    except Exception as exc:  # a malformed entry must not stop release-all
        return True, f"could not undo cgroup hold {entry!r}: {exc}"


def _undo(entry: JournalEntry) -> tuple[bool, list[str]]:
    """Thaw and restore the quota (not the moves); (whether all of it is undone, what was
    done)."""
    done: list[str] = []
    ok = True
    freeze, quota = entry.get("freeze"), entry.get("quota")
    if isinstance(freeze, dict) and freeze.get("version") in FREEZE_FILE:
        version = freeze["version"]
        ok &= _undo_write(Path(str(freeze.get("path"))) / FREEZE_FILE[version],
                          FREEZE_VALUES[version][1], "thawed", done)
    if isinstance(quota, dict) and quota.get("version") in QUOTA_FILE:
        ok &= _undo_write(Path(str(quota.get("path"))) / QUOTA_FILE[quota["version"]],
                          str(quota.get("original")), "restored the quota of", done)
    return ok, done


def _undo_write(file: Path, value: str, what: str, done: list[str]) -> bool:
    if not file.is_absolute():
        done.append(f"ignored {file}: not an absolute path")
        return True
    try:
        _write(file, value)
    except FileNotFoundError:
        done.append(f"{file.parent} is gone")
    except OSError as exc:
        done.append(f"could not write {value!r} to {file}: {exc.strerror}")
        return False
    else:
        done.append(f"{what} {file.parent}")
    return True


def _return_moved(moved: dict[str, object]) -> tuple[bool, list[str]]:
    """Move every process left in the created cgroups back to the cgroup it came from (one
    forked there since: where the job's first process came from), then remove the created
    cgroups; (False when a later try may do more, what was done). A process whose
    original cgroup is gone, or not known, stays where it is: never in the governor's own
    cgroup, which systemd's KillMode would kill it with."""
    created_dirs = moved.get("created")
    listed = moved.get("processes")
    if not isinstance(created_dirs, dict) or not isinstance(listed, list):
        return True, [f"ignored a malformed record of moved processes: {moved!r}"]
    origins: dict[int, tuple[float, dict[str, Path]]] = {}
    for item in listed:
        with contextlib.suppress(TypeError, ValueError):
            pid, started, dirs = item
            origins[int(pid)] = (float(started), {str(n): Path(str(d))
                                                  for n, d in dict(dirs).items()})
    root_pid = moved.get("root")
    root = origins.get(root_pid) if isinstance(root_pid, int) else None
    ok, done = True, []
    for name, value in created_dirs.items():
        directory = Path(str(value))
        if not directory.is_absolute() or not JOB_DIR.fullmatch(directory.name):
            done.append(f"ignored {directory}: not a cgroup governor made")
            continue
        returned = 0
        stuck: set[int] = set()
        for _ in range(RMDIR_TRIES):
            for pid in _pids(directory):
                if pid in stuck:
                    continue
                origin = origins.get(pid)
                identity = identify(pid)
                if origin is None or identity is None or identity.started_at != origin[0]:
                    origin = root
                target = origin[1].get(name) if origin is not None else None
                why = _move_back(pid, directory, target)
                if why is None:
                    returned += 1
                    continue
                stuck.add(pid)
                done.append(why[1])
                ok &= why[0]
            try:
                directory.rmdir()
            except FileNotFoundError:
                break
            except OSError:
                if stuck and set(_pids(directory)) <= stuck:
                    done.append(f"kept {directory}: processes that cannot go back are in it")
                    break
                time.sleep(0.05)
                continue
            done.append(f"removed {directory}")
            break
        else:
            ok = False
            done.append(f"cannot remove {directory}: processes are still in it")
        if returned:
            done.append(f"moved {returned} process(es) back from {directory}")
    return ok, done


def _move_back(pid: int, directory: Path, target: Path | None) -> tuple[bool, str] | None:
    """Move one process back to `target`; None when done (or it exited), else (whether
    that is final, the sentence saying why it stays)."""
    if target is None or target == directory:
        return True, (f"process {pid} stays in {directory}: the cgroup it came from is "
                      "not known")
    try:
        _write(target / "cgroup.procs", str(pid))
    except ProcessLookupError:
        return None
    except FileNotFoundError:
        return True, (f"process {pid} stays in {directory}: its original cgroup {target} "
                      "is gone")
    except OSError as exc:
        return False, f"cannot move process {pid} back to {target}: {exc.strerror}"
    return None


@dataclass
class _Held:
    """What the actuator knows of one attached job."""

    freeze_h: Hierarchy
    freeze: Path
    quota_h: Hierarchy | None = None
    quota: Path | None = None
    #: cpu.stat (v2) or cpuacct.usage (v1); None sums the processes of the freeze cgroup
    usage_file: Path | None = None
    #: the cgroups attach created, by hierarchy name; empty for a cgroup given at registration
    created: dict[str, Path] = field(default_factory=dict)
    root_pid: int | None = None
    #: pid to (start time, hierarchy name to cgroup path) of each process attach moved
    origins: dict[int, tuple[float, dict[str, str]]] = field(default_factory=dict)
    #: the hold this actuator has in the journal; None while the job runs free
    entry: JournalEntry | None = None
    original_quota: str | None = None
    period_us: int = 100_000
    quota_us: int | None = None
    #: the slow speed quota_us is for
    speed: float | None = None
    #: CPU cores used while running unthrottled, averaged
    demand: float | None = None
    #: CPU cores used while slowed, over the last measured round
    slow_rate: float | None = None
    last_action: Action = Action.RUN
    #: the speed of the directive last applied (a slow one's: the window it is judged on)
    measured_speed: float = 1.0
    last_usage: float | None = None
    last_time: float = 0.0
    warned: set[str] = field(default_factory=set)


class CgroupActuator:
    """Pauses and slows jobs through cgroups; a job named by a pid gets a cgroup of its own
    (`governor-<id>`) beside the governor's, so its later children are held too."""

    mode = Mode.CGROUP

    def __init__(self, journal: Journal, *, version: Literal["auto", "v1", "v2"] = "auto",
                 mountinfo: Path = MOUNTINFO,
                 own_cgroups: Path = Path("/proc/self/cgroup"),
                 period: float = 0.1, freeze_timeout: float = 2.0,
                 protected: Callable[[], Iterable[int]] = tuple,
                 services: ProtectedServices = DEFAULT_SERVICES):
        self.journal = journal
        #: the node's services: a cgroup holding one is never frozen or limited
        self._services = services
        #: more pids never to hold besides init, the governor and its ancestors (asked
        #: each time: the guardian may be restarted)
        self._also_protected = protected
        self.period_us = min(max(MIN_QUOTA_US, round(period * 1e6)), 1_000_000)
        self.freeze_timeout = freeze_timeout
        self._mounts = find_hierarchies(mountinfo)
        #: every cgroup mount, also a second view of the host's tree (a DaemonSet's
        #: /host/cgroup), where a cgroup given as a directory is looked for
        self._every = every_hierarchy(mountinfo)
        self._version = version
        own = memberships(own_cgroups)
        self._own = {name: own.get(name, "/") for name in self._mounts}
        allowed = [h for h in self._mounts.values() if version in ("auto", h.version)]
        self._freezers = sorted((h for h in allowed if h.name in ("v2", "freezer")),
                                key=lambda h: h.name != "v2")
        self._quotas = sorted((h for h in allowed if h.name in ("v2", "cpu")),
                              key=lambda h: h.name != "v2")
        if not self._freezers:
            wanted = {"auto": "cgroup v2 or the v1 freezer", "v2": "cgroup v2",
                      "v1": "the v1 freezer"}[version]
            raise ActuatorError(f"cannot hold jobs through cgroups: {mountinfo} shows no "
                                f"mount of {wanted}")

    # ---- the Actuator protocol ----

    def attach(self, job: Job) -> None:
        self._attach(job)

    def apply(self, job: Job, directive: Directive) -> None:
        held = job.extra.get(EXTRA_KEY)
        if not isinstance(held, _Held):
            held = self._attach(job)
        action = directive.action
        self._measure(held, action, directive.speed)
        if action is not Action.RUN and (pid := self._protected_inside(held.freeze)):
            self._release(job, held)
            raise ProtectedProcessError(f"cgroup {held.freeze} now holds pid {pid} (init, "
                                        "the governor, one of its ancestors, a kernel "
                                        "thread or Slurm's slurmstepd): not holding it")
        if action is not Action.RUN and (service := self._service_inside(held.freeze)):
            self._release(job, held)
            raise ProtectedProcessError(f"cgroup {held.freeze} now holds {service}, one of "
                                        "the node's services: not holding it")
        if action is Action.SLOW and held.quota is None:
            self._warn(held, f"job {job.id}: no CPU quota can be set on its cgroup, so it "
                             "is paused instead of slowed")
            action = Action.PAUSE
        if action is Action.RUN:
            self._release(job, held)
        elif action is Action.PAUSE:
            self._pause(job, held)
        else:
            self._slow(job, held, directive.speed)
        held.last_action = action

    def detach(self, job: Job) -> None:
        try:
            self._detach(job)
        except Exception:
            log.warning("could not fully detach job %s from its cgroup", job.id, exc_info=True)

    def close(self) -> None:
        """No threads to stop."""

    def sweep(self, keep: Iterable[str]) -> list[Path]:
        """Remove the empty `governor-<id>` cgroups of jobs not in `keep`: a daemon that
        was killed could not remove the cgroups it created, and their jobs have ended."""
        kept = {f"governor-{job_id}" for job_id in keep}
        removed = []
        for h in self._mounts.values():
            parent = h.dir(posixpath.dirname(self._own[h.name]))
            try:
                names = [n for n in os.listdir(parent) if n.startswith("governor-")]
            except OSError:
                continue
            for name in names:
                directory = parent / name
                if name in kept or not JOB_ID.fullmatch(name.removeprefix("governor-")):
                    continue
                try:
                    directory.rmdir()  # fails while processes are in it: those stay
                except OSError:
                    continue
                removed.append(directory)
        if removed:
            log.info("removed %d empty cgroup(s) left by an earlier run", len(removed))
        return removed

    # ---- attach ----

    def _attach(self, job: Job) -> _Held:
        name = f"governor-{job.id}"
        if job.pid is not None and (job.cgroup is None or PurePath(job.cgroup).name == name):
            held = self._attach_pid(job, job.pid, name)
        elif job.cgroup is not None:
            held = self._attach_cgroup(job.cgroup)
            job.cgroup = str(held.freeze)  # one spelling per cgroup, whatever was given
        else:
            raise ActuatorError(f"job {job.id} names neither a process nor a cgroup")
        if pid := self._protected_inside(held.freeze):
            raise ProtectedProcessError(f"cgroup {held.freeze} holds pid {pid}, which is "
                                        "init, the governor, one of its ancestors, a "
                                        "kernel thread or Slurm's slurmstepd")
        if service := self._service_inside(held.freeze):
            raise ProtectedProcessError(f"cgroup {held.freeze} holds {service}, one of the "
                                        "node's services")
        self._adopt(job, held)
        held.last_usage, held.last_time = self._usage(held), time.monotonic()
        job.extra[EXTRA_KEY] = held
        return held

    def _attach_pid(self, job: Job, pid: int, name: str) -> _Held:
        if not JOB_ID.fullmatch(job.id):
            raise ActuatorError(f"job id {job.id!r} cannot name a cgroup")
        identity = (identify(pid) if job.pid_started_at is None
                    else ProcessIdentity(pid, job.pid_started_at))
        if identity is None or not is_alive(identity):
            raise ActuatorError(f"process {pid} has exited")
        freeze_h = self._freezers[0]
        quota_h = self._quota_for_new_cgroup()
        held = _Held(freeze_h, freeze_h.dir(self._beside_own(freeze_h, name)), quota_h,
                     root_pid=pid)
        self._adopt(job, held)
        self._known_origins(job, held)
        try:
            for h in dict.fromkeys(h for h in (freeze_h, quota_h) if h is not None):
                directory = h.dir(self._beside_own(h, name))
                try:
                    directory.mkdir(exist_ok=True)
                except OSError as exc:
                    raise ActuatorError(f"cannot create cgroup {directory}: "
                                        f"{exc.strerror}") from exc
                held.created[h.name] = directory
            held.quota = held.created.get(quota_h.name) if quota_h is not None else None
            self._move_tree(job, held, identity)
        except ActuatorError:
            self._return_processes(job, held, released=held.entry is None)
            raise
        held.usage_file = self._usage_file(held)
        job.cgroup = str(held.freeze)
        job.saved["cgroup_origins"] = {
            str(pid): [started, paths] for pid, (started, paths) in held.origins.items()}
        return held

    def _known_origins(self, job: Job, held: _Held) -> None:
        """Where processes already in the job's cgroups came from, as an earlier run knew
        it (the job's saved state, the journal's record of the moves), so that they still
        go back there; a process moved from now on is recorded afresh."""
        for pid, (started, paths) in job.saved.get("cgroup_origins", {}).items():
            held.origins[int(pid)] = (float(started), dict(paths))
        moved = (self.journal.holds().get(hold_key(job)) or {}).get("moved")
        for item in moved.get("processes") or [] if isinstance(moved, dict) else []:
            with contextlib.suppress(TypeError, ValueError):
                pid, started, dirs = item
                paths = {n: cg for n, d in dict(dirs).items() if n in self._mounts
                         and (cg := self._mounts[n].cgroup(Path(str(d)))) is not None}
                held.origins.setdefault(int(pid), (float(started), paths))

    def _protected_inside(self, directory: Path) -> int | None:
        """A process in this cgroup or below that must never be held, if there is one."""
        never = {1, os.getpid(), *ancestors(os.getpid()), *self._also_protected()}
        for dirpath, _dirs, _files in os.walk(directory):
            for pid in _pids(Path(dirpath)):
                if (pid in never or is_kernel_thread(pid)
                        or never_held(pid)):
                    return pid
        return None

    def _service_inside(self, directory: Path) -> str | None:
        """One of the node's services in this cgroup or below, in words, if there is one."""
        for dirpath, _dirs, _files in os.walk(directory):
            for pid in _pids(Path(dirpath)):
                if (what := self._services.which(pid)) is not None:
                    return f"pid {pid}, {what}"
        return None

    def _beside_own(self, h: Hierarchy, name: str) -> str:
        """The cgroup path of `name` in the governor's parent cgroup of this hierarchy."""
        return posixpath.join(posixpath.dirname(self._own[h.name]), name)

    def _quota_for_new_cgroup(self) -> Hierarchy | None:
        for h in self._quotas:
            if h.version == "v1":
                return h
            parent = h.dir(posixpath.dirname(self._own[h.name]))
            if "cpu" in _words(parent / "cgroup.controllers") and _enable_cpu(parent):
                return h
        return None

    def _move_tree(self, job: Job, held: _Held, identity: ProcessIdentity) -> None:
        """Move the tree into the created cgroups until none of it is left outside: the
        tree may fork while it is moved, and a child forked after its parent moved is in.
        Where each process is comes into the journal before it is moved."""
        targets = {n: self._mounts[n].cgroup(d) for n, d in held.created.items()}
        for _ in range(MOVE_ROUNDS):
            members = tree(identity)
            if not members:
                raise ActuatorError(f"process {identity.pid} has exited")
            if any(m.pid == os.getpid() for m in members):
                raise ActuatorError(f"process {identity.pid} is the governor or its ancestor")
            for member in members:
                if (what := self._services.which(member.pid)) is not None:
                    raise ProtectedProcessError(
                        f"the tree of process {identity.pid} holds pid {member.pid}, {what}, "
                        "one of the node's services")
            moves: list[tuple[int, list[str]]] = []
            for member in members:
                now = process_cgroups(member.pid)
                outside = [n for n in held.created if now.get(n) != targets[n]]
                if not outside or not is_alive(member):
                    continue
                moves.append((member.pid, outside))
                started, known = held.origins.get(member.pid, (member.started_at, {}))
                if started != member.started_at:
                    known = {}
                held.origins[member.pid] = (member.started_at, {
                    **known, **{n: now[n] for n in outside if n in now}})
            if not moves:
                return
            self._journal_moves(job, held)
            for pid, outside in moves:
                for n in outside:
                    _enter(held.created[n], pid)
        raise ActuatorError(f"process {identity.pid} forks faster than it can be moved "
                            "into its cgroup")

    def _attach_cgroup(self, given: str) -> _Held:
        directory = Path(os.path.normpath(given))
        # a directory: the tree of mounts it lies in, whichever view of the host's
        # cgroups that is; a cgroup path: the governor's own mounts
        tree = {n: h for n, h in tree_of(directory, self._every).items()
                if self._version in ("auto", h.version)} if directory.is_absolute() else {}
        named = {h.name: cg for h in tree.values()
                 if directory.is_relative_to(h.mount) and (cg := h.cgroup(directory)) is not None}
        if named:
            cgroup = next(iter(named.values()))
            freezers = [tree[n] for n in ("v2", "freezer") if n in tree]
            quotas = [tree[n] for n in ("v2", "cpu") if n in tree]
        elif given.startswith("/"):
            cgroup = posixpath.normpath(given)
            freezers, quotas, tree = self._freezers, self._quotas, self._mounts
        else:
            raise ActuatorError(f"cgroup {given!r} is neither under a cgroup mount nor a "
                                "cgroup path starting with /")
        if cgroup == "/":
            raise ActuatorError("refusing to hold a root cgroup: it holds every process")
        if not freezers:
            raise ActuatorError(f"cgroup {given!r} lies in no cgroup v2 or v1 freezer "
                                "hierarchy")
        freeze_h = next((h for h in freezers if h.name in named), freezers[0])
        freeze = freeze_h.dir(cgroup)
        if not freeze.is_dir():
            raise ActuatorError(f"no cgroup at {freeze}")
        own = self._own.get(freeze_h.name)
        if own is not None and (own + "/").startswith(cgroup.rstrip("/") + "/") \
                and freeze_h.mount == self._mounts[freeze_h.name].mount:
            raise ActuatorError(f"cgroup {cgroup} holds the governor itself")
        held = _Held(freeze_h, freeze)
        for h in sorted(quotas, key=lambda h: h.name not in named):
            if (h.dir(cgroup) / QUOTA_FILE[h.version]).is_file():
                held.quota_h, held.quota = h, h.dir(cgroup)
                break
        held.usage_file = self._usage_file(held, tree)
        return held

    def _adopt(self, job: Job, held: _Held) -> None:
        """Take over a hold an earlier run left in the journal on the same cgroup, so that a
        run directive after a restart releases it."""
        entry = self.journal.holds().get(hold_key(job))
        if entry is None or not isinstance(freeze := entry.get("freeze"), dict):
            return
        if freeze.get("path") != str(held.freeze):
            return
        held.entry = entry
        quota = entry.get("quota")
        if isinstance(quota, dict) and quota.get("path") == str(held.quota):
            held.original_quota = str(quota.get("original"))

    def _usage_file(self, held: _Held,
                    tree: dict[str, Hierarchy] | None = None) -> Path | None:
        for h, directory in ((held.freeze_h, held.freeze), (held.quota_h, held.quota)):
            if h is not None and directory is not None and h.version == "v2":
                return directory / "cpu.stat"
        if held.quota is not None and (held.quota / "cpuacct.usage").is_file():
            return held.quota / "cpuacct.usage"
        acct = (self._mounts if tree is None else tree).get("cpuacct")
        cgroup = held.freeze_h.cgroup(held.freeze)
        if acct is None or cgroup is None:
            return None
        file = acct.dir(cgroup) / "cpuacct.usage"
        return file if file.is_file() else None

    # ---- apply ----

    def _measure(self, held: _Held, action: Action, speed: float) -> None:
        """Learn the job's demand while it runs free (over windows of a CFS period), and
        its usage while slowed (over FEEDBACK_PERIODS of them: see there). A window ends
        early, unused if short, when the job is held differently from now on, so no
        window mixes two holds."""
        now, usage = time.monotonic(), self._usage(held)
        held.slow_rate = None
        changed = (action, speed) != (held.last_action, held.measured_speed)
        held.measured_speed = speed
        if usage is None or held.last_usage is None:
            held.last_usage, held.last_time = usage, now
            return
        periods = FEEDBACK_PERIODS if held.last_action is Action.SLOW else 1
        if now - held.last_time >= periods * self.period_us / 1e6:
            rate = max(0.0, usage - held.last_usage) / (now - held.last_time)
            if held.last_action is Action.RUN:
                held.demand = learn_demand(held.demand, rate)
            elif held.last_action is Action.SLOW:
                held.slow_rate = rate
        elif not changed:
            return
        held.last_usage, held.last_time = usage, now

    def _usage(self, held: _Held) -> float | None:
        """CPU seconds the job has used, or None if they cannot be read."""
        file = held.usage_file
        if file is None:
            return _procs_cpu_seconds(held.freeze)
        try:
            text = file.read_text()
        except OSError:
            return None
        if file.name == "cpuacct.usage":
            return int(text) / 1e9
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        return None

    def _hold(self, job: Job, held: _Held, frozen: bool) -> None:
        quota_h = held.quota_h
        entry: JournalEntry = {
            "kind": KIND, "job": job.id, "frozen": frozen,
            "freeze": {"version": held.freeze_h.version, "path": str(held.freeze)},
            "quota": None if held.original_quota is None or quota_h is None else {
                "version": quota_h.version, "path": str(held.quota),
                "original": held.original_quota},
        }
        held.entry = entry
        self._journal_moves(job, held)

    def _journal_moves(self, job: Job, held: _Held) -> None:
        """Write the job's entry: its hold, if one is in place, and the processes moved
        into the cgroups made for it with where each came from; none when neither."""
        moved = self._moved(held)
        if held.entry is None and moved is None:
            return
        entry: JournalEntry = dict(held.entry) if held.entry is not None else {
            "kind": KIND, "job": job.id, "frozen": False, "freeze": None, "quota": None}
        entry.pop("moved", None)
        if moved is not None:
            entry["moved"] = moved
        try:
            self.journal.put_hold(hold_key(job), entry)
        except OSError as exc:
            raise ActuatorError(f"cannot record the hold in the journal: {exc.strerror}") from exc

    def _moved(self, held: _Held) -> dict[str, object] | None:
        """The journal's record of the moves (see the module's docstring); None for a job
        whose cgroup was given."""
        if not held.created:
            return None
        return {
            "created": {n: str(d) for n, d in held.created.items()},
            "root": held.root_pid,
            "processes": [[pid, started, {n: str(self._mounts[n].dir(cg))
                                          for n, cg in paths.items() if n in self._mounts}]
                          for pid, (started, paths) in sorted(held.origins.items())],
        }

    def _pause(self, job: Job, held: _Held) -> None:
        self._hold(job, held, frozen=True)
        version = held.freeze_h.version
        state_file = held.freeze / FREEZE_FILE[version]
        frozen, thawed = FREEZE_VALUES[version]
        try:
            before = _read(state_file)
            if before == frozen:
                return
            _write(state_file, frozen)
        except OSError as exc:
            raise ActuatorError(f"cannot freeze cgroup {held.freeze}: {exc.strerror}") from exc
        if before == thawed and not self._wait_frozen(held):
            log.warning("cgroup %s of job %s is not frozen after %.1f s; it is still freezing",
                        held.freeze, job.id, self.freeze_timeout)

    def _wait_frozen(self, held: _Held) -> bool:
        deadline = time.monotonic() + self.freeze_timeout
        while True:
            try:
                if held.freeze_h.version == "v2":
                    done = "frozen 1" in _lines(held.freeze / "cgroup.events")
                else:
                    done = _read(held.freeze / "freezer.state") == "FROZEN"
            except OSError:
                return False
            if done:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)

    def _slow(self, job: Job, held: _Held, speed: float) -> None:
        assert held.quota_h is not None and held.quota is not None
        version, directory = held.quota_h.version, held.quota
        try:
            if held.original_quota is None:
                held.original_quota = _read(directory / QUOTA_FILE[version])
            if held.quota_us is None:
                # v1 keeps a limited cgroup's own period: undo restores the quota alone
                held.period_us = self.period_us
                if version == "v1" and held.original_quota != V1_UNLIMITED:
                    held.period_us = int(_read(directory / "cpu.cfs_period_us"))
            self._hold(job, held, frozen=False)
            self._set_quota(held, self._next_quota(held, speed))
        except OSError as exc:
            raise ActuatorError(f"cannot set the CPU quota of cgroup {directory}: "
                                f"{exc.strerror}") from exc
        try:
            _thaw(held)
        except OSError as exc:
            self._warn(held, f"cannot thaw cgroup {held.freeze} to slow job {job.id}: "
                             f"{exc.strerror}")

    def _next_quota(self, held: _Held, speed: float) -> int:
        """The quota's law (`next_quota`) on what was measured of the job."""
        state = next_quota(QuotaState(held.quota_us, held.speed), speed, demand=held.demand,
                           slow_rate=held.slow_rate, period_us=held.period_us)
        held.quota_us, held.speed = state.quota_us, state.speed
        assert state.quota_us is not None
        return state.quota_us

    def _set_quota(self, held: _Held, quota_us: int) -> None:
        """Write the quota unless it is there already, so a quota changed by someone else is
        set again."""
        assert held.quota_h is not None and held.quota is not None
        version, directory = held.quota_h.version, held.quota
        want = f"{quota_us} {held.period_us}" if version == "v2" else str(quota_us)
        if _read(directory / QUOTA_FILE[version]) == want:
            return
        if version == "v1" and _read(directory / "cpu.cfs_period_us") != str(held.period_us):
            _write(directory / "cpu.cfs_period_us", str(held.period_us))
        _write(directory / QUOTA_FILE[version], want)

    def _release(self, job: Job, held: _Held) -> bool:
        """Thaw and restore the original quota; drop the hold once all of it is undone."""
        if held.entry is None:
            return True
        complete, done = _undo(held.entry)
        if not complete:
            self._warn(held, f"cannot release job {job.id}: " + "; ".join(done))
            return False
        held.entry = held.original_quota = held.quota_us = held.speed = None
        if held.created:
            self._journal_moves(job, held)  # the moves stay until the processes are back
        else:
            self.journal.drop_hold(hold_key(job))
        return True

    def _warn(self, held: _Held, message: str) -> None:
        """Log a problem once per job, not every round."""
        if message not in held.warned:
            held.warned.add(message)
            log.warning("%s", message)

    # ---- detach ----

    def _detach(self, job: Job) -> None:
        key = hold_key(job)
        held = job.extra.pop(EXTRA_KEY, None)
        if not isinstance(held, _Held):
            entry = self.journal.holds().get(key)
            if entry is not None:
                ok, line = undo_checked(entry)
                log.log(logging.INFO if ok else logging.WARNING, "%s", line)
                if ok:
                    self.journal.drop_hold(key)
            return
        released = self._release(job, held)
        if held.created:
            self._return_processes(job, held, released)
            if str(held.freeze) == job.cgroup:
                job.cgroup = None

    def _return_processes(self, job: Job, held: _Held, released: bool = True) -> None:
        """Move what is left in the created cgroups back where it came from and remove
        them; drop the job's entry once nothing is left to undo."""
        returned, done = _return_moved(self._moved(held) or {})
        for line in done:
            (log.info if line.startswith(("moved", "removed")) else log.warning)(
                "job %s: %s", job.id, line)
        gone = not any(d.exists() for d in held.created.values())
        if returned and (released or gone):
            self.journal.drop_hold(hold_key(job))


def _enter(directory: Path, pid: int) -> None:
    try:
        _write(directory / "cgroup.procs", str(pid))
    except ProcessLookupError:
        pass  # it exited
    except OSError as exc:
        raise ActuatorError(f"cannot move process {pid} into cgroup {directory}: "
                            f"{exc.strerror}") from exc


def _enable_cpu(parent: Path) -> bool:
    """Make the cpu controller available to the children of a v2 cgroup."""
    if "cpu" in _words(parent / "cgroup.subtree_control"):
        return True
    try:
        _write(parent / "cgroup.subtree_control", "+cpu")
    except OSError as exc:
        log.warning("cannot enable the cpu controller in %s (%s); jobs will be paused "
                    "instead of slowed", parent, exc.strerror)
        return False
    return True


def _thaw(held: _Held) -> None:
    version = held.freeze_h.version
    state_file = held.freeze / FREEZE_FILE[version]
    thawed = FREEZE_VALUES[version][1]
    if _read(state_file) != thawed:
        _write(state_file, thawed)


def _procs_cpu_seconds(directory: Path) -> float:
    total = 0.0
    for pid in _pids(directory):
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _pids(directory: Path) -> list[int]:
    try:
        return [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _read(file: Path) -> str:
    return file.read_text().strip()


def _lines(file: Path) -> list[str]:
    return file.read_text().splitlines()


def _words(file: Path) -> list[str]:
    try:
        return file.read_text().split()
    except OSError:
        return []


def _write(file: Path, text: str) -> None:
    """One write(2), as cgroup files want."""
    fd = os.open(file, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)



def from_context(context: ModeContext) -> CgroupActuator:
    """The cgroup mode's entry in governor/actuators/modes.py; ActuatorError where the
    machine has no cgroup hierarchy to hold jobs with."""
    jobs = context.config.jobs
    return CgroupActuator(context.journal, version=jobs.cgroup_version,
                          protected=context.protected,
                          services=ProtectedServices.of(jobs.protected_executables,
                                                        jobs.protected_units))
