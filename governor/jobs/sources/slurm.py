"""Slurm's jobs on this node, found in slurmd's spool and registered as governor jobs.

A poll lists the spool (one `scandir` per slurmd on the host) and compares the job ids
of the step sockets there with the jobs it knows. Only a new job costs forks: `scontrol
show job -d` for its name, owner, QOS, partition and the GPUs Slurm gave it on this node,
and `scontrol listpids` for one of its processes, whose cgroup names the job's cgroup
(`.../job_<id>` under proctrack/cgroup). The job is held through that cgroup, which every
step's processes, present and future, belong to; under proctrack/linuxproc there is
none, and the job is named by its first process instead (see README).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from governor.config import Config, SlurmConfig
from governor.host import cgroupfs
from governor.host import slurm as host
from governor.jobs.model import Mode
from governor.jobs.registry import JobRequest
from governor.jobs.sources.base import NOTHING, Changes

log = logging.getLogger(__name__)

#: the mode each `[slurm] hold` value holds a job in
HOLD_MODES = {"suspend": Mode.SUSPEND, "signal": Mode.SIGNAL, "cgroup": Mode.CGROUP}
#: cgroup hierarchies to name a job's cgroup in, best first: v2, else v1's freezer
HIERARCHY_ORDER = ("v2", "freezer")
#: a job that could not be made into a request is asked for again after RETRY_FIRST
#: seconds, then twice as long each time up to RETRY_MAX: a step socket that outlived its
#: slurmstepd (killed -9, OOM) stays in the spool, and must not cost two `scontrol` forks
#: every round for as long as it does
RETRY_FIRST, RETRY_MAX = 1.0, 60.0


class SlurmSource:
    name = "slurm"

    def __init__(self, config: SlurmConfig, *, site: host.SlurmSite | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.site = site or host.SlurmSite(config.conf)
        self.mode = HOLD_MODES[config.hold]
        self._spools: list[str] = []
        #: job id -> the nodes of this host it has steps on, for the jobs reported
        self._known: dict[str, frozenset[str]] = {}
        self._last_steps: frozenset[host.Step] | None = None
        #: job id -> (when to ask for it again, the delay before that, its last problem)
        self._retry: dict[str, tuple[float, float, str]] = {}
        self._clock = clock

    def poll(self) -> Changes:
        if not self._spools:
            self._spools = host.spool_dirs(self.site)
        now = self._clock()
        steps = host.running_steps(self._spools)
        if self.config.nodes:
            steps = frozenset(s for s in steps if s.node in self.config.nodes)
        if steps == self._last_steps and all(at > now for at, _, _ in self._retry.values()):
            return Changes(problems=self._pending_problems()) if self._retry else NOTHING
        self._last_steps = steps
        nodes: dict[str, set[str]] = {}
        for step in steps:
            nodes.setdefault(step.job_id, set()).add(step.node)
        ended = tuple(job for job in self._known if job not in nodes)
        for job in ended:
            del self._known[job]
        started: list[JobRequest] = []
        self._retry = {job: v for job, v in self._retry.items() if job in nodes}
        for job_id in sorted(set(nodes) - set(self._known), key=int):
            pending = self._retry.get(job_id)
            if pending is not None and pending[0] > now:
                continue
            try:
                request = self._request(job_id, frozenset(nodes[job_id]))
            except host.SlurmError as exc:
                delay = RETRY_FIRST if pending is None else min(2 * pending[1], RETRY_MAX)
                self._retry[job_id] = (now + delay, delay, f"Slurm job {job_id}: {exc}")
                continue
            self._retry.pop(job_id, None)
            if request is None:
                continue
            self._known[job_id] = frozenset(nodes[job_id])
            started.append(request)
        return Changes(tuple(started), ended, self._pending_problems())

    def _pending_problems(self) -> tuple[str, ...]:
        return tuple(self._retry[job][2] for job in sorted(self._retry, key=int)
                     if self._retry[job][2])

    def close(self) -> None:
        return None

    def _request(self, job_id: str, nodes: frozenset[str]) -> JobRequest | None:
        """The registration for a job found running, or None if it ended meanwhile."""
        job = host.show_job(self.site, job_id)
        if job is None:
            return None
        pids = [pid for node in sorted(nodes)
                for pid in host.list_pids(self.site, job_id, node)]
        cgroup = job_cgroup(job_id, pids)
        pid = None if cgroup is not None else (min(pids) if pids else None)
        if cgroup is None and pid is None:
            raise host.SlurmError("it has no processes on this node yet")
        devices = tuple(f"gpu{i}" for i in sorted({i for node in nodes
                                                   for i in job.gpus.get(node, ())}))
        return JobRequest(
            name=job.name or f"slurm-{job_id}", pid=pid, cgroup=cgroup, mode=self.mode,
            devices=devices, priority=self.priority(job.qos, job.partition),
            source="slurm", scheduler_id=job_id, user=job.user or None,
        )

    def priority(self, qos: str, partition: str) -> int:
        if qos and qos in self.config.qos_priority:
            return self.config.qos_priority[qos]
        if partition and partition in self.config.partition_priority:
            return self.config.partition_priority[partition]
        return self.config.default_priority


def job_cgroup(job_id: str, pids: Iterable[int]) -> str | None:
    """The directory of the job's own cgroup (the `job_<id>` level above its steps),
    from the cgroups of one of its processes; None when Slurm made none."""
    level = re.compile(rf"^(.*/job_{re.escape(job_id)})(?:/|$)")
    hierarchies = cgroupfs.find_hierarchies()
    for pid in pids:
        memberships = cgroupfs.process_cgroups(pid)
        for name in HIERARCHY_ORDER:
            path, hierarchy = memberships.get(name), hierarchies.get(name)
            if path is None or hierarchy is None:
                continue
            found = level.match(path)
            if found is not None:
                directory = hierarchy.dir(found.group(1))
                if Path(directory, "cgroup.procs").is_file():
                    return str(directory)
    return None


def from_config(config: Config) -> SlurmSource:
    """The Slurm source's entry in governor/jobs/sources/__init__.py."""
    return SlurmSource(config.slurm)
