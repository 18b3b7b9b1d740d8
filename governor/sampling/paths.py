"""Reads under `sources.sysfs_root` and `sources.procfs_root`, as node_exporter's paths.go.

Every sysfs or procfs read goes through here, so tests point the roots at fixture trees
and a container points them at the host's `/host/sys` and `/host/proc`. A file that is
missing or unreadable is "no data" (None), never an exception: sysfs attributes come and
go with drivers, and some raise EIO or ENODATA while a device sleeps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)


class SysPaths:
    def __init__(self, sysfs_root: str | os.PathLike[str], procfs_root: str | os.PathLike[str]):
        self.sysfs = Path(sysfs_root)
        self.procfs = Path(procfs_root)

    def sys(self, *parts: str) -> Path:
        return self.sysfs.joinpath(*parts)

    def proc(self, *parts: str) -> Path:
        return self.procfs.joinpath(*parts)


def read_text(path: Path) -> str | None:
    """The file's content without surrounding white space, or None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None
    return data.decode("utf-8", errors="replace").strip()


class OpenFiles:
    """The files a sampler reads every round, kept open and read again at offset 0.

    Opening and closing a file costs several times reading it (about 7 us against 1 us
    here), and a sampler reads dozens every round. A sysfs or procfs attribute read again
    at offset 0 is produced anew by the kernel, as when it is reopened; one whose device
    went away answers ENODEV. A file unlinked or replaced (on a fixture tree: tmpfs, where
    the old inode stays readable) has no links left. In both cases it is opened again by
    its path, so a read through here always gives what a fresh open would.
    """

    CHUNK = 65536

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def read_text(self, path: Path) -> str | None:
        """As `read_text(path)`: the content stripped, or None if it cannot be read."""
        key = os.fspath(path)
        fd = self._fds.get(key)
        if fd is not None:
            data = self._read(fd)
            if data is not None and os.fstat(fd).st_nlink > 0:
                return data.decode("utf-8", errors="replace").strip()
            del self._fds[key]
            os.close(fd)
        try:
            fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("cannot read %s: %s", path, exc)
            return None
        data = self._read(fd)
        if data is None:
            os.close(fd)
            log.debug("cannot read %s", path)
            return None
        self._fds[key] = fd
        return data.decode("utf-8", errors="replace").strip()

    def _read(self, fd: int) -> bytes | None:
        try:
            data = os.pread(fd, self.CHUNK, 0)
            while len(data) % self.CHUNK == 0 and data:  # a long /proc/stat
                more = os.pread(fd, self.CHUNK, len(data))
                if not more:
                    break
                data += more
        except OSError:
            return None
        return data

    def keep_only(self, paths: Iterable[Path]) -> None:
        """Close the files not among `paths` (the sensors a rescan no longer lists)."""
        keep = {os.fspath(p) for p in paths}
        for key in [k for k in self._fds if k not in keep]:
            os.close(self._fds.pop(key))

    def close(self) -> None:
        self.keep_only(())


def read_int(path: Path) -> int | None:
    """The file's content as an integer, or None if it is absent, unreadable or not a number."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        log.debug("not an integer in %s: %r", path, text[:40])
        return None


class Garbage(ValueError):
    """A file that was read but did not hold what its name promises."""


def read_int_strict(path: Path,
                    reader: Callable[[Path], str | None] | None = None) -> int | None:
    """Like read_int, but a file that holds something other than a number raises Garbage.

    Absent or unreadable files are still "no data"; a file that answers with nonsense is
    a fault worth reporting. `reader` reads it (default: read_text; or OpenFiles's).
    """
    text = (reader or read_text)(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise Garbage(f"{path}: not a number: {text[:40]!r}") from None


def sorted_entries(directory: Path, prefix: str) -> list[Path]:
    """Entries named prefix<N>, in numeric order (hwmon2 before hwmon10); [] if none."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
        return []
    numbered = []
    for name in names:
        suffix = name[len(prefix):]
        if suffix.isdigit():
            numbered.append((int(suffix), name))
    return [directory / name for _, name in sorted(numbered)]


def link_name(path: Path) -> str | None:
    """The last component of a symlink's target (a driver's name, a device's name)."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None
