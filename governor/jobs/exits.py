"""Which watched processes have exited, in one poll() per round.

A pidfd becomes readable when its process exits, so one poll() over every job's pidfd
replaces reading every job's /proc/PID/stat each round. The pidfd, opened at
registration and checked against the start time then, also pins the identity for good:
it can never come to mean a newcomer that took the pid. Kernels without pidfd_open fall
back to checking the start time each round.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select

from governor.jobs.process import ProcessIdentity, is_alive


def raise_fd_limit() -> None:
    """One pidfd per job: let the soft limit on open files go up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ExitWatch:
    def __init__(self) -> None:
        self._poll = select.poll()
        self._fds: dict[str, int] = {}
        self._keys: dict[int, str] = {}
        #: watched without a pidfd: checked by start time
        self._plain: dict[str, ProcessIdentity] = {}

    def watch(self, key: str, identity: ProcessIdentity) -> None:
        self.forget(key)
        try:
            fd = os.pidfd_open(identity.pid)
        except (AttributeError, OSError):
            self._plain[key] = identity
            return
        if not is_alive(identity):  # the pid already names another process, or none
            os.close(fd)
            self._plain[key] = identity
            return
        self._fds[key], self._keys[fd] = fd, key
        self._poll.register(fd, select.POLLIN)

    def forget(self, key: str) -> None:
        self._plain.pop(key, None)
        fd = self._fds.pop(key, None)
        if fd is not None:
            del self._keys[fd]
            self._poll.unregister(fd)
            os.close(fd)

    def exited(self) -> set[str]:
        """The keys whose process has exited since it was watched."""
        gone = {self._keys[fd] for fd, _ in self._poll.poll(0) if fd in self._keys}
        gone.update(key for key, identity in self._plain.items() if not is_alive(identity))
        return gone

    def close(self) -> None:
        for key in list(self._fds):
            self.forget(key)
