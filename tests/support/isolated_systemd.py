"""A real systemd as PID 1 of its own namespaces, with governor installed by `make install`
inside it, for tests of the shipped unit (tests/support/isolated_systemd.sh says how the
host is kept safe from it).

The host reaches into it three ways: `nsenter` (systemctl, and jobs started inside its
PID namespace), `/proc/<systemd's pid>/root` (its files: the config, the state directory,
the API socket, its overlays), and 127.0.0.1 (the namespaces share the host's network).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from tests.support.daemon import REPO

BOOT = Path(__file__).with_name("isolated_systemd.sh")
SYSTEMD = Path("/lib/systemd/systemd")
CGROUP = Path("/sys/fs/cgroup")
#: the cgroups systemd makes for its own units, in every hierarchy it manages
SYSTEMD_CGROUPS = ("init.scope", "system.slice")
#: host-wide settings systemd raises as PID 1 even in a container; put back afterwards
SYSCTLS = tuple(Path("/proc/sys") / name for name in (
    "net/unix/max_dgram_qlen", "fs/file-max", "fs/nr_open"))


def why_not() -> str | None:
    """Why a real systemd cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "booting systemd in new namespaces needs root"
    for tool in ("unshare", "nsenter", "make"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is not installed (Debian package systemd)"
    if subprocess.run(["/usr/bin/python3", "-c", "import ensurepip"],
                      capture_output=True).returncode != 0:
        return "/usr/bin/python3 cannot make a venv (Debian package python3-venv)"
    if not (CGROUP / "unified").is_dir() and not (CGROUP / "systemd").is_dir():
        return ("the boot script binds a hybrid or legacy cgroup tree (cgroup v1 with "
                "/sys/fs/cgroup/systemd or /unified); this host has only cgroup v2")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make new namespaces here: {probe.stderr.strip()}"
    return None


def children(pid: int) -> list[int]:
    """A process's children (none once it is gone)."""
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


class CanaryLost(AssertionError):
    """Something emptied the host's /tmp: the isolation failed."""


class IsolatedSystemd:
    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.canary = Path("/tmp") / f"governor-systemd-canary-{uuid.uuid4().hex}"
        self.boot_process: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self._cgroups_before: set[Path] = set()
        self._sysctls: dict[Path, str] = {}

    # ---- life ----

    def boot(self, timeout: float = 300.0) -> IsolatedSystemd:
        self.canary.write_text("if this file is gone, a test's systemd emptied /tmp\n")
        self._sysctls = {path: path.read_text() for path in SYSCTLS if path.exists()}
        self._cgroups_before = set(self._systemd_cgroups())
        with open(self.logdir / "boot.log", "wb") as log:
            # --kill-child: if unshare dies, so does everything in the namespace
            self.boot_process = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc",
                 "--uts", "--ipc", "bash", str(BOOT), str(REPO)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.boot_process.poll() is not None:
                self.shutdown()
                raise AssertionError(f"the isolated systemd did not boot:\n{self.boot_log()}")
            pid = self._systemd_pid()
            if pid and self._running(pid):
                self.pid = pid
                self.check_canary()
                return self
            self.pid = pid
            time.sleep(0.2)
        self.shutdown()
        raise AssertionError(f"no systemd after {timeout} s:\n{self.boot_log()}")

    def _systemd_pid(self) -> int:
        """The host pid of the namespace's PID 1: unshare's child, once it is systemd."""
        assert self.boot_process is not None
        for pid in children(self.boot_process.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return pid
        return 0

    def _running(self, pid: int) -> bool:
        result = subprocess.run(["nsenter", "-t", str(pid), "-m", "-p", "systemctl",
                                 "is-system-running"], capture_output=True, text=True)
        return result.stdout.strip() in ("running", "degraded")

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop every unit and exit, as `systemctl poweroff` would (SIGRTMIN+3 asks a
        container's systemd to halt), then take away the cgroups it made."""
        if self.boot_process is None:
            return
        if self.pid and self.boot_process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGRTMIN + 3)
        try:
            self.boot_process.wait(timeout)
        except subprocess.TimeoutExpired:
            # killing PID 1 of the namespace ends every process in it
            with contextlib.suppress(ProcessLookupError):
                if self.pid:
                    os.kill(self.pid, signal.SIGKILL)
                os.killpg(self.boot_process.pid, signal.SIGKILL)
            self.boot_process.wait()
        self._remove_cgroups()
        for path, value in self._sysctls.items():
            with contextlib.suppress(OSError):
                if path.read_text() != value:
                    path.write_text(value)
        self.check_canary()
        self.canary.unlink()

    def check_canary(self) -> None:
        if not self.canary.exists():
            raise CanaryLost(f"{self.canary} is gone: the host's /tmp was emptied by the "
                             "systemd under test (see tests/support/isolated_systemd.sh)")

    def _systemd_cgroups(self) -> list[Path]:
        found = []
        for hierarchy in CGROUP.iterdir():
            for name in SYSTEMD_CGROUPS:
                top = hierarchy / name
                if top.is_dir():
                    found += [top, *(p for p in top.rglob("*") if p.is_dir())]
        return found

    def _remove_cgroups(self) -> None:
        """The cgroups the isolated systemd made in the host's hierarchies, deepest first
        (they are empty once it has halted)."""
        made = [p for p in self._systemd_cgroups() if p not in self._cgroups_before]
        for directory in sorted(made, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()

    def boot_log(self) -> str:
        return (self.logdir / "boot.log").read_text(errors="replace")

    # ---- reaching in ----

    @property
    def root(self) -> Path:
        """Its file system as it sees it (its /run, its overlays)."""
        return Path(f"/proc/{self.pid}/root")

    def inside(self, *argv: str, check: bool = False,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a command inside its mount and PID namespaces."""
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "--", *argv],
                              capture_output=True, text=True, check=check, timeout=timeout)

    def systemctl(self, *args: str, check: bool = False,
                  timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.inside("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in properties),
                             check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def write_dropin(self, unit: str, name: str, text: str) -> None:
        directory = self.root / "run/systemd/system" / f"{unit}.d"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
        self.systemctl("daemon-reload", check=True)

    def remove_dropin(self, unit: str, name: str) -> None:
        (self.root / "run/systemd/system" / f"{unit}.d" / name).unlink(missing_ok=True)
        self.systemctl("daemon-reload", check=True)

    def start_job(self, argv: Sequence[str], user: str | None = None) -> tuple[
            subprocess.Popen[bytes], int, int]:
        """A process inside its PID namespace (as `user`, if given): the nsenter that waits
        for it, its host pid, and its pid as the daemon there sees it."""
        command = list(argv)
        if user is not None:
            command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                       *command]
        waiter = subprocess.Popen(["nsenter", "-t", str(self.pid), "-m", "-p", "--", *command],
                                  start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for pid in children(waiter.pid):
                inner = self.inner_pid(pid)
                with contextlib.suppress(OSError):
                    exe = Path(f"/proc/{pid}/exe").resolve().name
                    if inner is not None and exe not in ("nsenter", "setpriv"):
                        return waiter, pid, inner
            time.sleep(0.02)
        waiter.kill()
        raise AssertionError(f"no process started inside for {argv}")

    def inner_pid(self, host_pid: int) -> int | None:
        """Its pid in the namespace, from the NSpid line of /proc/PID/status."""
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{host_pid}/status").read_text()
            match = re.search(r"^NSpid:\s+(.+)$", status, re.MULTILINE)
            if match:
                pids = match.group(1).split()
                if len(pids) > 1:
                    return int(pids[-1])
        return None

    def host_pid(self, inner: int) -> int | None:
        """The host pid of a process the daemon inside calls `inner`."""
        namespace = os.readlink(f"/proc/{self.pid}/ns/pid")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if (os.readlink(entry / "ns/pid") == namespace
                        and self.inner_pid(int(entry.name)) == inner):
                    return int(entry.name)
        return None

    def daemon_log(self) -> str:
        path = self.root / "run/governor-test/daemon.log"
        return path.read_text(errors="replace") if path.exists() else "(no daemon log)"
