"""Whose scheduler's job a process is, from what its user cannot forge.

The daemon suspends a Slurm job with root's rights, so a user (a restricted caller of
the unix socket) may name one only from a process of that job, and only a job of their
own. A process's environment (`SLURM_JOB_ID`) is the caller's to choose; its cgroup is
not: Slurm's proctrack/cgroup puts every process of a job in
`/slurm[_<node>]/uid_<uid>/job_<id>/...` (cgroup v1) or
`/system.slice/[<node>_]slurmstepd.scope/job_<id>/...` (v2), directories that root made
and owns, where no user can create one (a user's delegated subtree, as systemd's
user@.service, is owned by the user and lies elsewhere). The job's owner is Slurm's
word (`scontrol show job`), asked outside the controller's lock.
"""

from __future__ import annotations

import os
import pwd
import re

from governor.host import cgroupfs
from governor.host import slurm as host

#: a Slurm job's cgroup as proctrack/cgroup lays it out, from the hierarchy's root
SLURM_V1 = re.compile(r"^/slurm(?:_[^/]+)?/uid_\d+/job_(?P<job>\d+)(?:/|$)")
SLURM_V2 = re.compile(r"^/(?:[^/]+\.slice/)*(?:[^/]+_)?slurmstepd\.scope/job_(?P<job>\d+)"
                      r"(?:/|$)")


def slurm_jobs_of(pid: int) -> set[str]:
    """The Slurm jobs whose cgroups (made and owned by root, in Slurm's layout) hold the
    process; empty for a process of no job, or a gone one."""
    hierarchies = cgroupfs.find_hierarchies()
    found: set[str] = set()
    for name, path in cgroupfs.process_cgroups(pid).items():
        hierarchy = hierarchies.get(name)
        match = (SLURM_V2 if name == "v2" else SLURM_V1).match(path)
        if hierarchy is None or match is None:
            continue
        try:
            owner = os.stat(hierarchy.dir(path[:match.end("job")])).st_uid
        except OSError:
            continue
        if owner == 0:
            found.add(match["job"])
    return found


def slurm_owner_problem(conf: str, job_id: str, uid: int) -> str | None:
    """Why a user (uid) may not name Slurm job `job_id`, in one sentence; None when Slurm
    says it is theirs. Runs `scontrol show job`: never call it under the controller's
    lock."""
    try:
        job = host.show_job(host.SlurmSite(conf), job_id)
    except host.SlurmError as exc:
        return f"Slurm cannot confirm who owns job {job_id} ({exc})."
    if job is None:
        return f"Slurm has no job {job_id}."
    if job.uid != uid:
        return (f"Slurm job {job_id} is not yours; only root or a token holder may name "
                "another user's job.")
    return None


def slurm_user_uid(user: str | None) -> int | None:
    """The uid of the user Slurm says a job runs as; None if this host knows none."""
    if not user:
        return None
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None
