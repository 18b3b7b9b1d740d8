"""Processes named by (pid, start time), so a reused pid is never taken for the old one.

The identity is checked immediately before every signal, through a pidfd where the
kernel has one: a pidfd refers to one process for its whole life, so once it is open and
the start time matches, a signal through it cannot reach a newcomer that took the pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

from governor.host.procfs import (
    CLOCK_TICKS,
    PF_KTHREAD,
    ancestors,
    descendants,
    is_kernel_thread,
    read_stat,
    uid,
)

__all__ = [
    "CLOCK_TICKS", "PF_KTHREAD", "ProcessIdentity", "ancestors", "identify", "is_alive",
    "is_kernel_thread", "owner_uid", "send_signal", "tree",
]


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
    found = read_stat(pid)
    return None if found is None else ProcessIdentity(pid, found.started_at)


def is_alive(identity: ProcessIdentity) -> bool:
    """The same process still runs (not a zombie, not a newcomer that took its pid)."""
    found = read_stat(identity.pid)
    return found is not None and found.started_at == identity.started_at and found.state != b"Z"


def tree(root: ProcessIdentity) -> list[ProcessIdentity]:
    """The root and all its living descendants, parents before children; [] if the root
    is gone or its pid now names another process."""
    if not is_alive(root):
        return []
    found = [root]
    for pid in descendants(root.pid):
        identity = identify(pid)
        if identity is not None:
            found.append(identity)
    return found


def owner_uid(pid: int) -> int | None:
    return uid(pid)


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
