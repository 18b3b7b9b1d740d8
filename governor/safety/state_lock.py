"""`state_dir/lock`: one daemon owns a state directory and its journal at a time.

A second daemon on the same directory would release the first one's holds at start and
fight it over every job, so it refuses to start instead. The guardian of a daemon that
died takes the lock while it releases, so a daemon restarted at that moment waits for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path


class LockHeld(Exception):
    def __init__(self, path: Path, pid: int | None):
        self.path = path
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"another governor ({who}) is using {path.parent}")


class StateLock:
    def __init__(self, state_dir: str | os.PathLike[str]):
        self.path = Path(state_dir) / "lock"
        self._fd: int | None = None

    def acquire(self, timeout: float = 0.0) -> None:
        """Take the lock, waiting up to `timeout` seconds; LockHeld if it stays taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockHeld(self.path, self.holder()) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def holder(self) -> int | None:
        """The pid written by the process that holds (or last held) the lock."""
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def held_elsewhere(self) -> bool:
        """Whether another process holds the lock now (without taking it)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
