"""A job and the directive the policy gives it.

A job is a registered workload the governor may slow or pause: a process tree (by pid),
a cgroup, or a cooperative client that holds itself. Its mode says which actuator holds
it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from governor.client.progress import Progress


class Mode(StrEnum):
    SIGNAL = "signal"
    CGROUP = "cgroup"
    COOPERATIVE = "cooperative"
    SUSPEND = "suspend"


class Action(StrEnum):
    """What a directive asks of a job; the most restrictive wins."""

    RUN = "run"
    SLOW = "slow"
    PAUSE = "pause"


@dataclass(frozen=True, slots=True)
class Directive:
    action: Action
    #: share of normal speed the job keeps: 1 running, 0 paused, else the slow speed
    speed: float
    #: why: one line per rule or operator hold that asked for it
    reasons: tuple[str, ...] = ()
    #: the names of the rules that asked for it ("operator" for an operator hold)
    rules: tuple[str, ...] = ()
    #: whether a cooperative job may put it off while inside a critical section; false
    #: when a rule holding the job says `defer = false`
    defer: bool = True

    @property
    def state(self) -> str:
        """The job state this directive puts a job in: running, slowed or paused."""
        return {Action.RUN: "running", Action.SLOW: "slowed", Action.PAUSE: "paused"}[
            self.action
        ]

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.action.value, "speed": self.speed, "reasons": list(self.reasons),
                "defer": self.defer}

    def same_hold(self, other: Directive) -> bool:
        """Equal in what an actuator must do (reasons aside)."""
        return self.action == other.action and self.speed == other.speed


RUN = Directive(Action.RUN, 1.0)


def pause(*reasons: str, rules: tuple[str, ...] = (), defer: bool = True) -> Directive:
    return Directive(Action.PAUSE, 0.0, reasons, rules, defer)


def slow(speed: float, *reasons: str, rules: tuple[str, ...] = (),
         defer: bool = True) -> Directive:
    return Directive(Action.SLOW, speed, reasons, rules, defer)


def strictest(directives: list[Directive]) -> Directive:
    """Pause over slow over run; the lower speed over the higher. Reasons of every
    directive that holds the job are kept, so a job shows everything that holds it; one
    that may not be deferred makes the whole directive act at once."""
    held = [d for d in directives if d.action is not Action.RUN]
    if not held:
        return RUN
    # built at once, not through dataclasses.replace: this runs for every held job every
    # round (a third of the policy's time at 1,000 jobs went to replace's introspection)
    if any(d.action is Action.PAUSE for d in held):
        action, speed = Action.PAUSE, 0.0
    else:
        action, speed = Action.SLOW, min(d.speed for d in held)
    reasons = tuple(dict.fromkeys(r for d in held for r in d.reasons))
    rules = tuple(dict.fromkeys(r for d in held for r in d.rules))
    return Directive(action, speed, reasons, rules, all(d.defer for d in held))


@dataclass
class Job:
    """A registered job. Mutable: the registry owns it and guards it with its lock."""

    id: str
    name: str
    mode: Mode
    pid: int | None
    #: the process's start time (psutil's create_time); with the pid, its identity
    pid_started_at: float | None
    #: the cgroup the job is held through: given at registration, or the one the cgroup
    #: actuator created for a pid
    cgroup: str | None
    #: devices given at registration ("gpu0", "card0", "accel0")
    devices: tuple[str, ...]
    priority: int
    registered_at: float
    #: uid of the process owner (or of the caller, for cooperative jobs)
    owner_uid: int | None = None
    #: set when a non-root caller registered the job over the unix socket: only that
    #: user's processes of the job may be held (a setuid child is left alone)
    restricted_uid: int | None = None
    held_by_operator: bool = False
    #: who put the operator hold in place ("token", "uid 1000 (unix socket)"...), and the
    #: uid of that caller when it was a restricted one (None: root or a token holder, whose
    #: hold only root or a token holder may lift)
    held_by: str | None = None
    hold_uid: int | None = None
    #: found by a scheduler's source (discovery), not registered through the API: its user
    #: may not unregister it
    discovered: bool = False
    #: GPUs NVML lists one of the job's processes on (unbound jobs only)
    auto_devices: frozenset[str] = frozenset()
    #: what the job is asked to do now
    directive: Directive = RUN
    #: bumped whenever the directive changes; cooperative clients long-poll on it
    directive_version: int = 0
    #: wall time the process was found gone, if it was
    gone_at: float | None = None
    #: the actuator's working state (not persisted)
    extra: dict[str, Any] = field(default_factory=dict)
    #: what the actuator needs to survive a restart (JSON): kept in the journal's record
    saved: dict[str, Any] = field(default_factory=dict)
    #: where the job came from: "api", "launch", or a scheduler ("slurm")
    source: str = "api"
    #: the scheduler's id for it (the Slurm job id), for a scheduler's job
    scheduler_id: str | None = None
    #: the user it runs as (the scheduler's word for a scheduler's job, else the owner's)
    user: str | None = None
    #: what a cooperative client last reported (not persisted: its totals come again
    #: with its next poll)
    progress: Progress | None = None
    #: "resumed" while someone outside governor (an administrator's `scontrol resume`)
    #: let the job run during a pause governor then stood aside from; set and cleared by
    #: its actuator, so the job's state tells what the job does, not what it was asked
    #: (not persisted: a restarted daemon holds the job anew)
    outside: str | None = None

    @property
    def bound_devices(self) -> frozenset[str]:
        """The devices rules on per-device metrics look at."""
        return frozenset(self.devices) if self.devices else self.auto_devices

    @property
    def state(self) -> str:
        """What the job does: gone, running while resumed outside governor, else what its
        directive asks."""
        if self.gone_at is not None:
            return "gone"
        return "running" if self.outside == "resumed" else self.directive.state

    @property
    def speed(self) -> float:
        """The share of normal speed the job runs at: full while resumed outside governor,
        else its directive's."""
        return 1.0 if self.outside == "resumed" else self.directive.speed

    def as_dict(self) -> dict[str, Any]:
        """The job as the API shows it; "outside" only while it is resumed outside
        governor."""
        entry: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "pid": self.pid,
            "pid_started_at": self.pid_started_at,
            "cgroup": self.cgroup,
            "mode": self.mode.value,
            "devices": sorted(self.bound_devices),
            "devices_from": "registration" if self.devices else (
                "nvml" if self.auto_devices else None),
            "priority": self.priority,
            "state": self.state,
            "speed": self.speed,
            "reasons": list(self.directive.reasons),
            "held_by_operator": self.held_by_operator,
            "registered_at": self.registered_at,
            "owner_uid": self.owner_uid,
            "gone_at": self.gone_at,
            "source": self.source,
            "scheduler_id": self.scheduler_id,
            "user": self.user,
        }
        if self.outside is not None:
            entry["outside"] = self.outside
        return entry

    def to_record(self) -> dict[str, Any]:
        """What the journal keeps of the job, to take it back after a restart."""
        entry = self.as_dict()
        entry.pop("outside", None)
        return {**entry, "devices": list(self.devices),
                "restricted_uid": self.restricted_uid, "saved": self.saved,
                "held_by": self.held_by, "hold_uid": self.hold_uid,
                "discovered": self.discovered}

    @classmethod
    def from_record(cls, job_id: str, record: Mapping[str, Any]) -> Job:
        """The job a journal record (to_record's) describes; KeyError, TypeError or
        ValueError for a record that does not."""
        pid = record.get("pid")
        started = record.get("pid_started_at")
        return cls(
            id=job_id, name=str(record["name"]), mode=Mode(record["mode"]),
            pid=int(pid) if pid is not None else None,
            pid_started_at=float(started) if started is not None else None,
            cgroup=record.get("cgroup"),
            devices=tuple(str(d) for d in record.get("devices", ())),
            priority=int(record.get("priority", 0)),
            registered_at=float(record["registered_at"]),
            owner_uid=record.get("owner_uid"),
            held_by_operator=bool(record.get("held_by_operator", False)),
            held_by=_optional_str(record.get("held_by")),
            hold_uid=_optional_int(record.get("hold_uid")),
            discovered=bool(record.get("discovered", False)),
            restricted_uid=record.get("restricted_uid"),
            saved=dict(record.get("saved") or {}),
            source=str(record.get("source") or "api"),
            scheduler_id=_optional_str(record.get("scheduler_id")),
            user=_optional_str(record.get("user")),
        )


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
