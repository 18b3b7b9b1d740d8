"""The guardian: a small process that releases every hold if the daemon dies.

The daemon starts it with the read end of a pipe whose write end only the daemon holds.
However the daemon ends (SIGKILL, a crash, the OOM killer), the kernel closes that end,
the guardian's read returns, and it undoes every hold the journal lists, exactly as
`governor release-all` does. It needs no systemd and no timer: it wakes at once. After a
clean exit the daemon has already released everything, and the guardian finds nothing to
do. It ignores SIGINT, SIGTERM and SIGHUP, so a signal meant for the daemon's terminal
or service cannot take it down first.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

#: how long a guardian waits for the lock of a daemon that just died before deciding a new
#: daemon owns the state directory (and has released the holds itself)
LOCK_WAIT = 2.0


class Guardian:
    """The daemon's handle on its guardian process."""

    def __init__(self, state_dir: Path):
        self._state_dir = state_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_fd: int | None = None
        self.spawn()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def spawn(self) -> None:
        read_fd, write_fd = os.pipe()  # both close-on-exec: no other child inherits them
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "governor.safety.guardian", str(self._state_dir),
                 str(read_fd)],
                pass_fds=[read_fd], start_new_session=True, stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(read_fd)
        self._write_fd = write_fd
        log.info("guardian started (pid %d): if this daemon dies, it releases every job",
                 self._proc.pid)

    def ensure(self) -> bool:
        """Start a new guardian if this one died. True when one was started."""
        if self._proc is None or self._proc.poll() is None:
            return False
        log.warning("the guardian (pid %d) exited with %s; starting a new one", self._proc.pid,
                    self._proc.returncode)
        self._close_pipe()
        self.spawn()
        return True

    def _close_pipe(self) -> None:
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None

    def stop(self, timeout: float = 5.0) -> None:
        """After a clean release: closing the pipe lets the guardian check and exit."""
        self._close_pipe()
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the guardian (pid %d) did not exit; leaving it", self._proc.pid)


def watch(state_dir: Path, read_fd: int) -> int:
    """The guardian's life: wait for the daemon to go, then release what it left held.
    Everything the release needs is imported before the wait, not after."""
    from governor.safety.journal import Journal
    from governor.safety.release import release_holds
    from governor.safety.state_lock import LockHeld, StateLock

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            if not os.read(read_fd, 4096):
                break
        except InterruptedError:
            continue
    lock = StateLock(state_dir)
    try:
        lock.acquire(timeout=LOCK_WAIT)
    except LockHeld as exc:
        log.info("guardian: %s, which releases what it finds; nothing to do", exc)
        return 0
    try:
        journal = Journal(state_dir)
        for problem in journal.load():
            log.error("guardian: %s", problem)
        for line in release_holds(journal):
            log.warning("guardian: the daemon is gone; %s", line)
    finally:
        lock.release()
    return 0


def main(argv: list[str]) -> int:
    from governor.text import PrintableFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter(  # the journal's job names, escaped
        "%(asctime)s %(levelname)s governor.safety.guardian[%(process)d]: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    state_dir, read_fd = Path(argv[0]), int(argv[1])
    return watch(state_dir, read_fd)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
