"""Processes named by (pid, start time), so a reused pid is never taken for the old one.

The identity is checked immediately before every signal, through a pidfd where the
kernel has one: a pidfd refers to one process for its whole life, so once it is open and
the start time matches, a signal through it cannot reach a newcomer that took the pid.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

#: task flag of kernel threads (include/linux/sched.h)
PF_KTHREAD = 0x00200000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@functools.cache
def _boot_time() -> float:
    """The boot time, read once. psutil reads it on every call, and it moves when the
    wall clock is stepped: identities computed with it would stop matching themselves."""
    return float(psutil.boot_time())


def _stat(pid: int) -> tuple[bytes, float] | None:
    """(state letter, start time) from /proc/PID/stat, the start time as psutil's
    create_time() computes it; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # the command may hold spaces
    return fields[0], float(fields[19]) / CLOCK_TICKS + _boot_time()


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    pid: int
    #: psutil's create_time: boot time plus the start ticks, the same value on every read
    started_at: float

    def as_list(self) -> list[float]:
        return [self.pid, self.started_at]


def identify(pid: int) -> ProcessIdentity | None:
    """The identity of the process that has this pid now, or None if there is none."""
    if pid <= 0:
        return None
    found = _stat(pid)
    return None if found is None else ProcessIdentity(pid, found[1])


def is_alive(identity: ProcessIdentity) -> bool:
    """The same process still runs (not a zombie, not a newcomer that took its pid)."""
    found = _stat(identity.pid)
    return found is not None and found[1] == identity.started_at and found[0] != b"Z"


def _child_pids(pid: int) -> list[int] | None:
    """The children of a process from /proc/PID/task/*/children: this reads only the
    process's own entries, where psutil scans every process on the machine. None when
    the kernel has no such file (built without CONFIG_PROC_CHILDREN)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    children: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{task}"):
                continue  # the thread just exited
            return None
        except OSError:
            continue
    return children


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    queue = [pid]
    while queue:
        children = _child_pids(queue.pop(0))
        if children is None:  # no children files: ask psutil, which scans /proc
            try:
                return [p.pid for p in psutil.Process(pid).children(recursive=True)]
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                return []
        found.extend(children)
        queue.extend(children)
    return found


def tree(root: ProcessIdentity) -> list[ProcessIdentity]:
    """The root and all its living descendants, parents before children; [] if the root
    is gone or its pid now names another process."""
    if not is_alive(root):
        return []
    found = [root]
    for pid in _descendants(root.pid):
        identity = identify(pid)
        if identity is not None:
            found.append(identity)
    return found


def is_kernel_thread(pid: int) -> bool:
    if pid == 2:  # kthreadd
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # fields after the command, which may itself hold spaces and parentheses
    fields = stat[stat.rindex(b")") + 2:].split()
    return bool(int(fields[6]) & PF_KTHREAD) or int(fields[1]) == 2  # flags; ppid kthreadd


def ancestors(pid: int) -> set[int]:
    """The pids of every ancestor of a process, up to pid 1."""
    found: set[int] = set()
    try:
        process: psutil.Process | None = psutil.Process(pid).parent()
        while process is not None and process.pid not in found:
            found.add(process.pid)
            process = process.parent()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        pass
    return found


def owner_uid(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).uids().real)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


@contextlib.contextmanager
def _pidfd(pid: int) -> Iterator[int | None]:
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def send_signal(identity: ProcessIdentity, sig: int) -> bool:
    """Signal exactly this process. False when it is gone or its pid names another one;
    PermissionError when this user may not signal it.

    The pidfd is opened first and the start time checked after: if they match, the fd
    holds the right process and the signal cannot go astray even if it exits now.
    """
    with _pidfd(identity.pid) as fd:
        if not is_alive(identity):
            return False
        try:
            if fd is not None:
                signal.pidfd_send_signal(fd, sig)
            else:  # kernels before 5.1: the identity check just above is the guard
                os.kill(identity.pid, sig)
        except ProcessLookupError:
            return False
    return True
