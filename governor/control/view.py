"""What the controller publishes after every change, for the API and the metrics to read
without its lock: typed and immutable, turned into JSON only where it leaves (as_json),
and only when it is read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from governor.client.progress import Progress
from governor.jobs.model import Directive, Job, Mode


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as /v1/jobs shows it; `as_json` is that entry."""

    id: str
    name: str
    pid: int | None
    pid_started_at: float | None
    cgroup: str | None
    mode: Mode
    #: the devices rules look at, sorted: the registered ones, else those NVML bound
    devices: tuple[str, ...]
    #: "registration", "nvml", or None when there are none
    devices_from: str | None
    priority: int
    #: running, slowed, paused or gone
    state: str
    speed: float
    reasons: tuple[str, ...]
    held_by_operator: bool
    registered_at: float
    owner_uid: int | None
    gone_at: float | None
    #: where it came from ("api", "launch", "slurm"), the scheduler's id, its user
    source: str = "api"
    scheduler_id: str | None = None
    user: str | None = None
    #: why the actuator cannot bring the job to its directive, while it cannot
    error: str | None = None
    #: what a cooperative client last reported
    progress: Progress | None = None
    #: "resumed" while someone outside governor let it run during a pause (state running,
    #: speed 1, the reasons still the pause's)
    outside: str | None = None

    @classmethod
    def of(cls, job: Job) -> JobView:
        error = job.extra.get("error")
        return cls(
            id=job.id, name=job.name, pid=job.pid, pid_started_at=job.pid_started_at,
            cgroup=job.cgroup, mode=job.mode, devices=tuple(sorted(job.bound_devices)),
            devices_from="registration" if job.devices else (
                "nvml" if job.auto_devices else None),
            priority=job.priority, state=job.state, speed=job.speed,
            reasons=job.directive.reasons, held_by_operator=job.held_by_operator,
            registered_at=job.registered_at, owner_uid=job.owner_uid, gone_at=job.gone_at,
            source=job.source, scheduler_id=job.scheduler_id, user=job.user,
            error=str(error) if error is not None else None, progress=job.progress,
            outside=job.outside,
        )

    def as_json(self) -> dict[str, Any]:
        """The entry: Job.as_dict's keys ("outside" where there is), then "error" and
        "progress" where there are."""
        entry: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "pid": self.pid,
            "pid_started_at": self.pid_started_at,
            "cgroup": self.cgroup,
            "mode": self.mode.value,
            "devices": list(self.devices),
            "devices_from": self.devices_from,
            "priority": self.priority,
            "state": self.state,
            "speed": self.speed,
            "reasons": list(self.reasons),
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
        if self.error is not None:
            entry["error"] = self.error
        if self.progress is not None:
            entry["progress"] = self.progress.as_dict()
        return entry


@dataclass(frozen=True, slots=True)
class DirectiveView:
    """A job's directive and its version, which moves on with every change."""

    directive: Directive
    version: int

    def as_json(self) -> dict[str, Any]:
        """The directive as /v1/jobs/{id}/directive shows it, before the version."""
        return self.directive.as_dict()


class LazyRules(Sequence[dict[str, Any]]):
    """/v1/rules's entries, made on first read. Every round publishes a new view, and a
    round is more frequent than a scrape or a `governor top` refresh: most views are never
    read. The states it is made from are replaced each round, never changed, so making it
    later, on another thread, gives what making it at once would."""

    def __init__(self, make: Callable[[], list[dict[str, Any]]]):
        self._make: Callable[[], list[dict[str, Any]]] | None = make
        self._entries: tuple[dict[str, Any], ...] = ()
        self._lock = threading.Lock()

    def _made(self) -> tuple[dict[str, Any], ...]:
        if self._make is not None:
            with self._lock:
                if self._make is not None:
                    self._entries, self._make = tuple(self._make()), None
        return self._entries

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | Sequence[dict[str, Any]]:
        return self._made()[index]

    def __len__(self) -> int:
        return len(self._made())


@dataclass(frozen=True)
class ControlView:
    """What the API and the metrics read: a copy, made after every change."""

    jobs: tuple[JobView, ...] = ()
    rules: Sequence[dict[str, Any]] = ()
    #: job id -> its directive and version
    directives: Mapping[str, DirectiveView] = field(default_factory=dict)
    #: GPU index -> the power cap in force, in watts
    power_caps: Mapping[str, float] = field(default_factory=dict)
    #: job id -> the names of the rules holding the job ("operator" for an operator
    #: hold); the reasons carry readings, too changeable for a metric label
    held_by: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
