"""systemd's notification protocol: one datagram to $NOTIFY_SOCKET, no library needed.

As gunicorn does it: the socket path comes from the environment (a leading "@" is the
abstract namespace), each message is KEY=VALUE lines. The variables are taken out of the
environment once read, so the guardian and anything else the daemon starts never speak
for it. The watchdog is pinged from the control loop after a healthy round, never from a
thread of its own, so a hung loop is noticed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: MutableMapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        env = os.environ if environ is None else environ
        self._clock = clock
        path = env.pop("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if path.startswith("@"):
            self._address = b"\0" + path[1:].encode()
        elif path:
            self._address = path
        usec = env.pop("WATCHDOG_USEC", "")
        pid = env.pop("WATCHDOG_PID", "")
        #: how often systemd wants a ping, or None without a watchdog (or one for
        #: another process)
        self.watchdog: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 1e6
        self._last_ping = float("-inf")
        self._last_status: str | None = None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *lines: str) -> bool:
        """Send one notification; False (and a debug line) if it could not be sent."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify %s: %s", lines, exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """STATUS=, only when it changed: systemctl status shows the latest."""
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def ping(self) -> None:
        """WATCHDOG=1, at most four times per watchdog period."""
        if self.watchdog is None:
            return
        now = self._clock()
        if now - self._last_ping >= self.watchdog / 4:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def summary(gpus: int, jobs: list[str], rules: list[dict[str, object]]) -> str:
    """The one line `systemctl status` shows: "2 GPUs, 3 jobs (1 paused), 1 rule tripped".
    `jobs`: each job's state."""
    held = {state: sum(1 for j in jobs if j == state) for state in ("paused", "slowed")}
    detail = ", ".join(f"{n} {state}" for state, n in held.items() if n)
    tripped = len({r["name"] for r in rules if r.get("state") == "tripped"})
    parts = [
        f"{gpus} GPU{'s' if gpus != 1 else ''}",
        f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}" + (f" ({detail})" if detail else ""),
        f"{tripped} rule{'s' if tripped != 1 else ''} tripped",
    ]
    return ", ".join(parts)
