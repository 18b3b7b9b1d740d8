"""The job registry and the rules for admitting a job.

Admission refuses what must never be held (pid 1, the governor, its ancestors, kernel
threads), what the caller may not touch (another user's process, over the unix socket),
and conflicts (a process already registered, a pid that now names another process),
each as a kind of refusal (governor/jobs/errors.py) with one sentence.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from governor.actuators import modes
from governor.host import procfs
from governor.jobs import process
from governor.jobs import scheduled as scheduled_jobs
from governor.jobs.errors import Conflict, NoSuchJob, NotPermitted, OverQuota, Unacceptable
from governor.jobs.model import Job, Mode
from governor.jobs.services import DEFAULT_SERVICES, ProtectedServices
from governor.jobs.sources import PUSHED

DEVICE = re.compile(r"^[A-Za-z][\w.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks. uid None: a token holder or root, who may govern any process."""

    uid: int | None
    via: str

    @property
    def restricted(self) -> bool:
        return self.uid is not None

    def __str__(self) -> str:
        return self.via


ROOT = Caller(None, "root")


@dataclass(frozen=True, slots=True)
class JobRequest:
    name: str
    pid: int | None = None
    cgroup: str | None = None
    mode: Mode | None = None
    devices: tuple[str, ...] = ()
    priority: int = 0
    #: optional: the start time the caller saw, so a pid reused since is refused
    pid_started_at: float | None = None
    #: where it comes from (governor/jobs/sources: "api", "launch", "slurm")
    source: str = "api"
    #: the scheduler's id for the job (a Slurm job id)
    scheduler_id: str | None = None
    #: the user the scheduler says it runs as
    user: str | None = None


def resolve_mode(request: JobRequest) -> Mode:
    """The mode asked for, else the one the table gives for what names the job; refused
    (Unacceptable) when the mode cannot hold a job named that way."""
    mode = request.mode or modes.default_mode(modes.named_by(request.pid, request.cgroup))
    why = modes.refusal(mode, request.pid, request.cgroup)
    if why is not None:
        raise Unacceptable(why)
    return mode


#: jobs.max_per_user's default
MAX_PER_USER = 64


class JobRegistry:
    def __init__(self, protected: Iterable[int] = (), max_per_user: int = MAX_PER_USER,
                 services: ProtectedServices = DEFAULT_SERVICES):
        self.lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        #: pids that must never be held besides pid 1 and the governor's own line
        self.protected = set(protected)
        #: jobs.max_per_user: how many jobs one restricted caller (a uid over the unix
        #: socket) may have registered at once
        self.max_per_user = max_per_user
        #: the node's own services (sshd, the kubelet...), never held
        self.services = services

    def get(self, job_id: str) -> Job:
        with self.lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NoSuchJob(f"There is no job {job_id!r}.")
        return job

    def all(self) -> list[Job]:
        with self.lock:
            return list(self._jobs.values())

    def add(self, job: Job) -> None:
        with self.lock:
            self._jobs[job.id] = job

    def remove(self, job_id: str) -> Job | None:
        with self.lock:
            return self._jobs.pop(job_id, None)

    def new_id(self) -> str:
        with self.lock:
            while (job_id := secrets.token_hex(4)) in self._jobs:
                pass
            return job_id

    def admit(self, request: JobRequest, caller: Caller, now: float) -> Job:
        """A new job for this request, checked; not yet added or attached."""
        name = request.name.strip()
        if not name:
            raise Unacceptable("A job needs a name.")
        self._check_quota(caller)
        mode = resolve_mode(request)
        for device in request.devices:
            if not DEVICE.match(device):
                raise Unacceptable(f"{device!r} is not a device name like gpu0, "
                                   "card0 or accel0.")
        if caller.restricted and (request.cgroup is not None or mode is Mode.CGROUP):
            raise NotPermitted("Only root or a token holder may use cgroups.")
        started_at = None
        owner = caller.uid
        if request.pid is not None:
            identity = self._check_pid(request, caller)
            started_at = identity.started_at
            owner = process.owner_uid(request.pid)
        if request.cgroup is not None:
            self._check_cgroup_free(request.cgroup)
        self._check_scheduled(request, mode, caller)
        return Job(
            id=self.new_id(), name=name, mode=mode, pid=request.pid,
            pid_started_at=started_at, cgroup=request.cgroup, devices=request.devices,
            priority=request.priority, registered_at=now, owner_uid=owner,
            restricted_uid=caller.uid, source=request.source,
            scheduler_id=request.scheduler_id,
            user=request.user or (procfs.user_name(owner) if owner is not None else None),
        )

    def _check_quota(self, caller: Caller) -> None:
        """A uid over the unix socket may have jobs.max_per_user jobs at once (those that
        exited count until they are forgotten); root and token holders, and the
        schedulers' sources, are trusted with any number."""
        if not caller.restricted:
            return
        with self.lock:
            held = sum(1 for job in self._jobs.values() if job.restricted_uid == caller.uid)
        if held >= self.max_per_user:
            raise OverQuota(f"Uid {caller.uid} already has {held} jobs registered, the most "
                            f"one user may have (jobs.max_per_user = {self.max_per_user}).")

    def _check_scheduled(self, request: JobRequest, mode: Mode, caller: Caller) -> None:
        """A scheduler's id comes with a scheduler's source; suspend mode needs a Slurm
        job; a scheduler's job is registered once; and a user may name a Slurm job only
        from a process of that job, told by its cgroup (jobs/scheduled.py), never by its
        environment, since the daemon would suspend it with root's rights. (That the job
        is the user's own is Slurm's word, asked by the controller outside its lock.)"""
        scheduled = request.source not in PUSHED
        if request.scheduler_id is not None and not scheduled:
            raise Unacceptable(f"A job from {request.source!r} has no scheduler_id; it "
                               "names a scheduler's job (source \"slurm\").")
        if scheduled and not request.scheduler_id:
            raise Unacceptable(f"A job from {request.source!r} needs its scheduler_id.")
        if mode is Mode.SUSPEND and (request.source != "slurm" or not request.scheduler_id):
            raise Unacceptable("Suspend mode holds a Slurm job: it needs source \"slurm\" "
                               "and the Slurm job id as scheduler_id.")
        if caller.restricted and scheduled and request.source != "slurm":
            raise NotPermitted(f"Only root or a token holder may register a job from "
                               f"{request.source!r}.")
        if caller.restricted and request.source == "slurm":
            if request.pid is None:
                raise NotPermitted("A user registers a Slurm job from one of its processes "
                                   "(pid).")
            if request.scheduler_id not in scheduled_jobs.slurm_jobs_of(request.pid):
                raise NotPermitted(f"Pid {request.pid} is not a process of Slurm job "
                                   f"{request.scheduler_id}.")
        if scheduled:
            self._check_scheduled_free(request.source, str(request.scheduler_id))

    def _check_scheduled_free(self, source: str, scheduler_id: str) -> None:
        with self.lock:
            for job in self._jobs.values():
                if (job.gone_at is None and job.source == source
                        and job.scheduler_id == scheduler_id):
                    raise Conflict(f"{source.capitalize()} job {scheduler_id} is already "
                                   f"registered as job {job.id} ({job.name}).")

    def _check_pid(self, request: JobRequest, caller: Caller) -> process.ProcessIdentity:
        pid = request.pid
        assert pid is not None
        if pid <= 0:
            raise Unacceptable(f"{pid} is not a process id.")
        if pid == 1:
            raise NotPermitted("Pid 1 (init) cannot be governed.")
        if pid == os.getpid():
            raise NotPermitted(f"Pid {pid} is the governor itself.")
        if pid in process.ancestors(os.getpid()):
            raise NotPermitted(f"Pid {pid} is an ancestor of the governor.")
        if pid in self.protected:
            raise NotPermitted(f"Pid {pid} belongs to the governor.")
        identity = process.identify(pid)
        if identity is None:
            raise Unacceptable(f"No process has pid {pid}.")
        if process.is_kernel_thread(pid):
            raise NotPermitted(f"Pid {pid} is a kernel thread.")
        self._check_service(pid)
        if request.pid_started_at is not None and request.pid_started_at != identity.started_at:
            raise Conflict(f"Pid {pid} is now another process (it started at "
                           f"{identity.started_at}, not {request.pid_started_at}).")
        if caller.restricted and process.owner_uid(pid) != caller.uid:
            raise NotPermitted(f"Pid {pid} is not yours; only root may govern "
                               "another user's process.")
        with self.lock:
            for job in self._jobs.values():
                if (job.gone_at is None and job.pid == pid
                        and job.pid_started_at == identity.started_at):
                    raise Conflict(f"Pid {pid} is already registered as job "
                                   f"{job.id} ({job.name}).")
        return identity

    def _check_service(self, pid: int) -> None:
        """The node's own services (`jobs.protected_executables`, `protected_units`) are
        never held, whoever asks."""
        what = self.services.which(pid)
        if what is not None:
            raise NotPermitted(f"Pid {pid} is {what}, one of the node's services, which "
                               "governor never holds.")

    def _check_cgroup_free(self, cgroup: str) -> None:
        with self.lock:
            for job in self._jobs.values():
                if job.gone_at is None and job.cgroup == cgroup:
                    raise Conflict(f"Cgroup {cgroup} is already registered as "
                                   f"job {job.id} ({job.name}).")
