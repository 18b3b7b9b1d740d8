"""The node's own services, which no job may hold: a stopped sshd locks every user out, a
frozen kubelet or slurmd takes the node out of its cluster, a stopped journald stalls
every service that logs.

A token holder or root may register any pid, and a job's tree or cgroup may come to hold
anything, so these are refused at registration (403) and left out of every hold. A
service is told by what its process cannot forge: it runs as root on the host's root
directory, and its executable (/proc/PID/exe) or the systemd unit whose cgroup it is in
is on the deny list (`[jobs] protected_executables`, `protected_units`). Its name (comm,
argv[0]) is not looked at: any process can call itself sshd. Nor is a process in a
container (a root other than the host's) ever one: root in a pod can run a file it named
sshd, and would otherwise make its own pod impossible to hold.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from governor.host import procfs
from governor.host.cgroupfs import systemd_unit

#: executables never held when run by root: a bare name matches the executable's file
#: name, an entry with a "/" the whole path
DEFAULT_PROTECTED_EXECUTABLES = (
    "sshd", "sshd-session", "systemd-journald", "kubelet", "containerd", "slurmd",
    "slurmctld", "munged",
)
#: systemd units whose root processes are never held (Debian's sshd is ssh.service)
DEFAULT_PROTECTED_UNITS = (
    "ssh.service", "sshd.service", "systemd-journald.service", "kubelet.service",
    "containerd.service", "slurmd.service", "slurmctld.service", "munge.service",
)


@dataclass(frozen=True, slots=True)
class ProtectedServices:
    """The deny list: what makes a root process one of the node's services."""

    executables: frozenset[str] = frozenset(DEFAULT_PROTECTED_EXECUTABLES)
    units: frozenset[str] = frozenset(DEFAULT_PROTECTED_UNITS)

    @classmethod
    def of(cls, executables: Iterable[str], units: Iterable[str]) -> ProtectedServices:
        return cls(frozenset(executables), frozenset(units))

    def which(self, pid: int) -> str | None:
        """What makes the process a protected service, in words for a refusal
        ("sshd (/usr/sbin/sshd)", "in ssh.service"); None when it is not one. A process
        not running as root costs one stat(2)."""
        if not (self.executables or self.units) or not procfs.runs_as_root(pid):
            return None
        if not procfs.in_host_root(pid):
            return None  # root in a container: its files, names and units are its own
        exe = procfs.executable(pid) if self.executables else None
        if exe is not None and (exe in self.executables
                                or os.path.basename(exe) in self.executables):
            return f"{os.path.basename(exe)} ({exe})"
        unit = systemd_unit(pid) if self.units else None
        if unit is not None and unit in self.units:
            return f"a process of {unit}"
        return None


#: the default deny list, as the config's defaults give it
DEFAULT_SERVICES = ProtectedServices()
