"""Real processes for the tests: busy children, their state and CPU time, waiting."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

BUSY = [sys.executable, "-c", "while True: pass"]


def state(pid: int) -> str:
    """The state letter in /proc/PID/stat: R running, S sleeping, T stopped..."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {what or check}")
        time.sleep(0.05)


def stays(check: Callable[[], bool], duration: float, what: str = "") -> None:
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert check(), f"stopped being true: {what or check}"
        time.sleep(0.05)


def busy_child() -> subprocess.Popen[bytes]:
    return subprocess.Popen(BUSY)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Kill a test child and its group, even if it is stopped."""
    try:
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
    except psutil.NoSuchProcess:
        pass
    process.kill()
    process.wait(10)
