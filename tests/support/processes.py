"""Real processes for the tests: busy children, their state and CPU time, waiting."""

from __future__ import annotations

import contextlib
import os
import shutil
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


def favour(pids: list[int]) -> None:
    """Raise the processes' priority where we may (root). The cores are shared with other
    work, and a job that is stopped and continued ten times a second loses out to it when
    it wakes; the priority keeps that load from deciding the shares measured here."""
    for pid in pids:
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, pid, -10)
        with contextlib.suppress(OSError):  # the job's session is an autogroup of its own
            Path(f"/proc/{pid}/autogroup").write_text("-10")


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


def in_a_root_of_its_own(program: Path, root: Path, *args: str) -> subprocess.Popen[bytes]:
    """Runs a copy of `program` as root inside `root` (a chroot holding the copy at its
    top and the libraries it loads): a container's process, as far as /proc/PID/root
    tells, whose files, names and uid 0 are its own to choose."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(program, root / program.name)
    libraries = subprocess.run(["ldd", str(program)], capture_output=True, text=True,
                               check=True).stdout
    for word in libraries.split():
        if word.startswith("/"):
            target = root / word.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(word, target)
    return subprocess.Popen([f"/{program.name}", *args],
                            preexec_fn=lambda: os.chroot(root))
