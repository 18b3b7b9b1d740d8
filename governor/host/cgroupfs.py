"""Cgroups through their file systems: the hierarchies mounted (from mountinfo, parsed
here only) and the cgroups of a process (from /proc/PID/cgroup)."""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MOUNTINFO = Path("/proc/self/mountinfo")
#: the v1 controllers governor uses: freezer to pause, cpu to slow, cpuacct to measure
V1_CONTROLLERS = frozenset({"freezer", "cpu", "cpuacct"})


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of mountinfo (proc(5)), its paths unescaped."""

    #: the path in the file system that is mounted ("/" unless a subtree is)
    root: str
    mount_point: str
    fstype: str
    super_options: frozenset[str]


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """A mounted cgroup hierarchy: "v2", or a v1 one named by its controller."""

    name: str
    mount: Path
    #: the cgroup mounted at `mount`: "/" unless a subtree is mounted
    root: str

    @property
    def version(self) -> Literal["v1", "v2"]:
        return "v2" if self.name == "v2" else "v1"

    def dir(self, cgroup: str) -> Path:
        """The directory of a cgroup path as /proc/PID/cgroup names it."""
        if self.root != "/" and (cgroup + "/").startswith(self.root + "/"):
            cgroup = cgroup[len(self.root):]
        return self.mount / cgroup.lstrip("/")

    def cgroup(self, directory: Path) -> str | None:
        """The cgroup path of a directory; None if it is not in this hierarchy."""
        if not directory.is_relative_to(self.mount):
            return None
        return posixpath.normpath(posixpath.join(self.root, str(directory.relative_to(self.mount))))


def unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (a space is \\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a mountinfo text; lines it cannot read are skipped."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) < sep + 4:
            continue
        found.append(Mount(unescape(fields[3]), unescape(fields[4]), fields[sep + 1],
                           frozenset(fields[sep + 3].split(","))))
    return found


def mounts(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """The mounts this process sees; [] when mountinfo cannot be read."""
    try:
        return parse_mountinfo(mountinfo.read_text())
    except OSError:
        return []


def find_hierarchies(mountinfo: Path = MOUNTINFO) -> dict[str, Hierarchy]:
    """The cgroup hierarchies mounted, by name: "v2", "freezer", "cpu", "cpuacct"."""
    found: dict[str, Hierarchy] = {}
    for mount in mounts(mountinfo):
        names = ["v2"] if mount.fstype == "cgroup2" else (
            sorted(mount.super_options & V1_CONTROLLERS) if mount.fstype == "cgroup" else [])
        for name in names:
            found.setdefault(name, Hierarchy(name, Path(mount.mount_point), mount.root))
    return found


def every_hierarchy(mountinfo: Path = MOUNTINFO) -> list[Hierarchy]:
    """Every mounted cgroup hierarchy, in mount order, a hierarchy mounted twice (the
    host's tree seen again at a container's /host/cgroup) listed twice."""
    found: list[Hierarchy] = []
    for mount in mounts(mountinfo):
        names = ["v2"] if mount.fstype == "cgroup2" else (
            sorted(mount.super_options & V1_CONTROLLERS) if mount.fstype == "cgroup" else [])
        found.extend(Hierarchy(name, Path(mount.mount_point), mount.root) for name in names)
    return found


def tree_of(directory: Path, hierarchies: list[Hierarchy]) -> dict[str, Hierarchy]:
    """The hierarchies, by name, of the cgroup tree `directory` lies in: the mount holding
    it, and the cgroup mounts beside that one (a v1 or hybrid tree mounts each hierarchy in
    a directory of one parent: freezer/, cpu,cpuacct/, unified/). {} when it is in none."""
    holding = [h for h in hierarchies if directory.is_relative_to(h.mount)]
    if not holding:
        return {}
    home = max(holding, key=lambda h: len(h.mount.parts))
    found = {h.name: h for h in holding if h.mount == home.mount}
    for h in hierarchies:
        if h.mount.parent == home.mount.parent and not home.mount.is_relative_to(h.mount):
            found.setdefault(h.name, h)
    return found


def in_cgroup_mount(directory: Path, mountinfo: Path = MOUNTINFO) -> bool:
    """Whether a directory (its real path: symlinks and `..` resolved) lies in a mounted
    cgroup file system, v2 or v1: the innermost mount holding it is one. A directory that
    merely has a `cgroup.procs` file in it, which anyone can make, is not a cgroup."""
    real = Path(os.path.realpath(directory))
    holding = [m for m in mounts(mountinfo) if real.is_relative_to(m.mount_point)]
    if not holding:
        return False
    innermost = max(enumerate(holding), key=lambda im: (len(Path(im[1].mount_point).parts),
                                                        im[0]))[1]
    return innermost.fstype in ("cgroup", "cgroup2")


def cgroup2_mount(mountinfo: Path = MOUNTINFO) -> Path | None:
    """Where the first cgroup2 is mounted; None when none is."""
    for mount in mounts(mountinfo):
        if mount.fstype == "cgroup2":
            return Path(mount.mount_point)
    return None


def memberships(source: Path) -> dict[str, str]:
    """Hierarchy name ("v2" or a v1 controller) to cgroup path, from a /proc/PID/cgroup file;
    empty when the process is gone."""
    found: dict[str, str] = {}
    try:
        lines = source.read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        hierarchy_id, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy_id == "0" and not controllers:
            found["v2"] = path
        for controller in filter(None, controllers.split(",")):
            found[controller] = path
    return found


def process_cgroups(pid: int) -> dict[str, str]:
    """The cgroups of a process by hierarchy name; empty when it is gone."""
    return memberships(Path(f"/proc/{pid}/cgroup"))


#: the suffixes of systemd's unit names that hold processes
UNIT_SUFFIXES = (".service", ".scope")


def systemd_unit(pid: int) -> str | None:
    """The systemd unit a process runs in ("ssh.service"), from its cgroup (v2, or v1's
    name=systemd hierarchy): the innermost path component that names a service or a
    scope. A process cannot leave its unit's cgroup without root. None outside any."""
    found = process_cgroups(pid)
    path = found.get("v2") or found.get("name=systemd") or ""
    for part in reversed(path.split("/")):
        if part.endswith(UNIT_SUFFIXES):
            return part
    return None


def subtree_pids(directory: Path) -> list[int]:
    """The processes in a cgroup and every cgroup below it (a v1 job cgroup holds its
    processes in step cgroups under it); [] when it is gone."""
    pids: list[int] = []
    for root, _dirs, files in os.walk(directory):
        if "cgroup.procs" not in files:
            continue
        try:
            text = Path(root, "cgroup.procs").read_text()
        except OSError:
            continue
        pids.extend(int(line) for line in text.split() if line.isdigit())
    return pids
