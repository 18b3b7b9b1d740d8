"""Processes through /proc: a process's stat, its children and ancestors, its uid.

/proc/PID/stat is parsed here only. The command (field 2) may hold spaces and
parentheses, so the fields are split after the last ')'.
"""

from __future__ import annotations

import functools
import os
import pwd

import psutil

#: task flag of kernel threads (include/linux/sched.h)
PF_KTHREAD = 0x00200000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: the pid of kthreadd, parent of every kernel thread
KTHREADD = 2


class ProcStat:
    """The fields of /proc/PID/stat that governor uses (proc(5)), converted when asked:
    identity checks before every signal read only the state and the start time."""

    __slots__ = ("_fields",)

    def __init__(self, fields: list[bytes]):
        #: the fields after the command, the state letter first
        self._fields = fields

    @property
    def state(self) -> bytes:
        """The state letter: b"R", b"S", b"T" (stopped), b"Z" (zombie)..."""
        return self._fields[0]

    @property
    def ppid(self) -> int:
        return int(self._fields[1])

    @property
    def flags(self) -> int:
        return int(self._fields[6])

    @property
    def cpu_ticks(self) -> int:
        """CPU time in user and kernel mode, in clock ticks."""
        return int(self._fields[11]) + int(self._fields[12])

    @property
    def start_ticks(self) -> int:
        """When the process started, in clock ticks after boot."""
        return int(self._fields[19])

    @property
    def started_at(self) -> float:
        """The start time in seconds since the epoch, as psutil's create_time()."""
        return self.start_ticks / CLOCK_TICKS + boot_time()

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD) or self.ppid == KTHREADD


def parse_stat(data: bytes | str) -> ProcStat | None:
    """The fields of a /proc/PID/stat text; None when it has too few. The numbers are
    converted when asked (ValueError if one is not a number: not a kernel's text)."""
    if isinstance(data, str):
        data = data.encode()
    end = data.rfind(b")")
    fields = data[end + 2:].split()
    return ProcStat(fields) if end >= 0 and len(fields) > 19 else None


def read_stat(pid: int, procfs: str = "/proc") -> ProcStat | None:
    """The stat of a process; None when there is no such process."""
    try:
        with open(f"{procfs}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return parse_stat(data)


def state(pid: int) -> bytes:
    """The state letter of a process; b"" when it is gone."""
    found = read_stat(pid)
    return b"" if found is None else found.state


@functools.cache
def boot_time() -> float:
    """The boot time, read once. psutil reads it on every call, and it moves when the
    wall clock is stepped: identities computed with it would stop matching themselves."""
    return float(psutil.boot_time())


def is_kernel_thread(pid: int) -> bool:
    if pid == KTHREADD:
        return True
    found = read_stat(pid)
    return found is not None and found.is_kernel_thread


def child_pids(pid: int) -> list[int] | None:
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


def descendants(pid: int) -> list[int]:
    """The pids of every descendant of a process, parents before children."""
    found: list[int] = []
    queue = [pid]
    while queue:
        children = child_pids(queue.pop(0))
        if children is None:  # no children files: ask psutil, which scans /proc
            try:
                return [p.pid for p in psutil.Process(pid).children(recursive=True)]
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                return []
        found.extend(children)
        queue.extend(children)
    return found


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


def uid(pid: int) -> int | None:
    """The real uid of a process; None when it is gone."""
    try:
        return int(psutil.Process(pid).uids().real)
    except psutil.Error:
        return None


def runs_as_root(pid: int) -> bool:
    """Whether the process runs as root: its /proc/PID directory belongs to uid 0, as the
    kernel sets it from the effective uid (or for a process that may not be dumped). One
    stat(2), for checks made on every member of a tree every round."""
    try:
        return os.stat(f"/proc/{pid}").st_uid == 0
    except OSError:
        return False


_host_root: tuple[int, int] | None = None


def _root_id(path: str) -> tuple[int, int]:
    found = os.stat(path)
    return found.st_dev, found.st_ino


def host_root() -> tuple[int, int]:
    """The host's root directory (device, inode): init's (/proc/1/root, readable to a
    privileged DaemonSet with the host's pid namespace), else this process's own `/`
    (the service's, under systemd: a mount namespace of its own keeps the same root)."""
    global _host_root
    if _host_root is None:
        try:
            _host_root = _root_id("/proc/1/root")
        except OSError:
            _host_root = _root_id("/")
    return _host_root


def in_host_root(pid: int) -> bool:
    """Whether the process sees the host's root directory: false for a process in a
    container (or a chroot), whose root, uid 0 and files are its own to make. A check
    that trusts a root process's executable must ask this first: root in a container
    can name any file sshd or slurmstepd."""
    try:
        return _root_id(f"/proc/{pid}/root") == host_root()
    except OSError:
        return False


def executable(pid: int) -> str | None:
    """The path of the program the process runs (/proc/PID/exe), which, unlike its name
    (/proc/PID/comm, argv[0]), the process cannot change; None when it is gone or may not
    be read (another user's process, to a governor not running as root)."""
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return None


def environ_value(pid: int, name: str) -> str | None:
    """One variable of a process's environment as it started (/proc/PID/environ, which
    only the process's owner and root may read); None if unset or unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            data = environ.read()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for entry in data.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):].decode(errors="replace")
    return None


def user_name(uid: int) -> str:
    """The login name of a uid, or the uid itself when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def command(pid: int) -> str:
    """The process's command name (/proc/PID/comm), "" when it is gone."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as comm:
            return comm.read().decode(errors="replace").strip()
    except OSError:
        return ""


#: the command name Slurm's step daemon runs under
SLURMSTEPD = "slurmstepd"


def is_slurmstepd(pid: int) -> bool:
    """Whether the process is Slurm's step daemon, judged by what a user cannot forge: it
    runs as root on the host's root directory (not in a container, whose root may run
    any file it calls slurmstepd), and its executable (/proc/PID/exe, not the name it
    gives itself) is a `slurmstepd`. slurmd double-forks it, so its parent is init or a
    subreaper, not slurmd, and tells nothing. The name is read first, so that every other
    process costs one small read."""
    if command(pid) != SLURMSTEPD:
        return False
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        with open(f"/proc/{pid}/status", "rb") as status:
            text = status.read()
    except OSError:
        return False
    # Debian's is /usr/sbin/slurmstepd-wlm, behind an alternatives link the comm was
    # taken from
    if not os.path.basename(exe.removesuffix(" (deleted)")).startswith(SLURMSTEPD):
        return False
    for line in text.splitlines():
        if line.startswith(b"Uid:"):
            real, effective = line.split()[1:3]
            return real == b"0" and effective == b"0" and in_host_root(pid)
    return False
