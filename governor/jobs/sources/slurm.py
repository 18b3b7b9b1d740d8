"""Slurm's jobs on this node, found in slurmd's spool and registered as governor jobs.

A poll lists the spool (one `scandir` per slurmd on the host) and compares the job ids
of the step sockets there with the jobs it knows. Only a new job costs forks, on the
source's own worker thread (see SlurmSource): `scontrol show job -d` for its name, owner,
QOS, partition and the GPUs Slurm gave it on this node, and `scontrol listpids` for one
of its processes, whose cgroup names the job's cgroup
(`.../job_<id>` under proctrack/cgroup). The job is held through that cgroup, which every
step's processes, present and future, belong to; under proctrack/linuxproc there is
none, and the job is named by its first process instead (see README).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
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
    """Slurm is asked on a worker thread of the source's own, never on the sampling
    loop's: `poll` lists the spool, hands each new job to the worker and returns the
    requests the worker finished since the last poll, so a slurmctld that is down or hung
    delays only the discovery of new jobs (each reported as a problem once it fails),
    never a round. An ended job is reported at the poll that sees its sockets gone."""

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
        #: job id -> the nodes of this host it has steps on, for the jobs seen running
        self._nodes: dict[str, frozenset[str]] = {}
        #: job id -> (when to ask for it again, the delay before that, its last problem)
        self._retry: dict[str, tuple[float, float, str]] = {}
        self._clock = clock
        #: jobs handed to the worker whose answer poll has not taken yet
        self._asking: set[str] = set()
        self._asks: queue.Queue[tuple[str, frozenset[str]] | None] = queue.Queue()
        #: job id -> what the worker found: a request, None (ended meanwhile) or the
        #: failure; guarded by _lock
        self._answers: dict[str, JobRequest | host.SlurmError | None] = {}
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def poll(self) -> Changes:
        if not self._spools:
            self._spools = host.spool_dirs(self.site)
        now = self._clock()
        steps = host.running_steps(self._spools)
        if self.config.nodes:
            steps = frozenset(s for s in steps if s.node in self.config.nodes)
        with self._lock:
            answers, self._answers = self._answers, {}
        if (steps == self._last_steps and not answers
                and all(at > now for at, _, _ in self._retry.values())):
            return Changes(problems=self._pending_problems()) if self._retry else NOTHING
        if steps != self._last_steps:
            self._last_steps = steps
            nodes: dict[str, set[str]] = {}
            for step in steps:
                nodes.setdefault(step.job_id, set()).add(step.node)
            self._nodes = {job: frozenset(found) for job, found in nodes.items()}
        ended = tuple(job for job in self._known if job not in self._nodes)
        for job in ended:
            del self._known[job]
        self._retry = {job: v for job, v in self._retry.items() if job in self._nodes}
        started = self._take(answers, now)
        for job_id in sorted(set(self._nodes) - set(self._known) - self._asking, key=int):
            pending = self._retry.get(job_id)
            if pending is None or pending[0] <= now:
                self._ask(job_id, self._nodes[job_id])
        return Changes(tuple(started), ended, self._pending_problems())

    def _take(self, answers: dict[str, JobRequest | host.SlurmError | None],
              now: float) -> list[JobRequest]:
        """The worker's answers: a job still running is reported, or asked for again
        after a back-off if Slurm failed; a job that ended meanwhile is forgotten."""
        started: list[JobRequest] = []
        for job_id in sorted(answers, key=int):
            self._asking.discard(job_id)
            answer = answers[job_id]
            if job_id not in self._nodes:
                continue  # its sockets went while Slurm was asked
            if answer is None or isinstance(answer, host.SlurmError):
                # failed, or Slurm knows no such job (a socket outliving it): asked again
                # later, the failure reported meanwhile
                pending = self._retry.get(job_id)
                delay = RETRY_FIRST if pending is None else min(2 * pending[1], RETRY_MAX)
                problem = "" if answer is None else f"Slurm job {job_id}: {answer}"
                self._retry[job_id] = (now + delay, delay, problem)
                continue
            self._retry.pop(job_id, None)
            self._known[job_id] = self._nodes[job_id]
            started.append(answer)
        return started

    def _pending_problems(self) -> tuple[str, ...]:
        return tuple(self._retry[job][2] for job in sorted(self._retry, key=int)
                     if self._retry[job][2])

    def close(self) -> None:
        """Stop the worker: it takes no new job, and ends once a call to Slurm under way
        returns (nothing waits for it: discovery's answers are of no use at exit)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            self._asks.put(None)
            worker.join(timeout=1.0)

    # ---- the worker ----

    def _ask(self, job_id: str, nodes: frozenset[str]) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="slurm-discovery",
                                            daemon=True)
            self._worker.start()
        self._asking.add(job_id)
        self._asks.put((job_id, nodes))

    def _work(self) -> None:
        while (ask := self._asks.get()) is not None:
            job_id, nodes = ask
            answer: JobRequest | host.SlurmError | None
            try:
                answer = self._request(job_id, nodes)
            except host.SlurmError as exc:
                answer = exc
            except Exception as exc:  # the worker must outlive any one job
                log.exception("Slurm job %s: could not be looked up", job_id)
                answer = host.SlurmError(f"could not be looked up: {exc!r}")
            with self._lock:
                self._answers[job_id] = answer

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
