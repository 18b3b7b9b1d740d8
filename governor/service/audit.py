"""The audit log: every action and operator request, one JSON line each, in state_dir.

It answers "who paused my job, and why?" days later, through `GET /v1/events` and
`governor events`. It is written under the controller's lock, so a write is one append
(a single write(2) on an O_APPEND descriptor, no fsync), and it never stands in an
action's way: a full disk or an I/O error is counted, reported in /v1/status and the
metrics, logged once, and the next event tries again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

FILENAME = "audit.jsonl"
#: how much of a file's end is read to find its last event
TAIL_BYTES = 64 * 1024

Event = dict[str, Any]


class AuditLog:
    """Appends events to `path`, rotating it by size into `path`.1 ... `path`.<keep>.

    Each event gets "time" (Unix seconds) and "seq", which goes on from the last event
    found at start; a gap in seq is an event that could not be written.
    """

    def __init__(self, path: Path, max_bytes: int, keep: int, *,
                 on_error: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._on_error = on_error
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._seq = last_seq(self._newest_first())
        self.errors = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._failing = False
        self._logged: set[str] = set()

    # ---- writing -------------------------------------------------------------------------

    def append(self, event: Event) -> None:
        """Write one event. Never raises: what it records happens whether or not it is
        written down."""
        with self._lock:
            self._seq += 1
            try:
                self._write(encode({"time": self._clock(), "seq": self._seq, **event}))
            except Exception as exc:
                self._failed(exc)
            else:
                self._recovered()

    def configure(self, max_bytes: int, keep: int) -> None:
        """New rotation limits (a reload); they apply from the next event."""
        with self._lock:
            self.max_bytes, self.keep = max_bytes, keep

    def close(self) -> None:
        with self._lock:
            self._close()

    def status(self) -> dict[str, Any]:
        """For /v1/status; no I/O."""
        return {"path": str(self.path), "ok": not self._failing, "errors": self.errors,
                "last_error": self.last_error, "last_error_at": self.last_error_at}

    def _write(self, line: bytes) -> None:
        if self._fd is None:
            self._open()
        if self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
            self._open()
        assert self._fd is not None
        written = os.write(self._fd, line)
        self._size += written
        if written < len(line):
            # the line is torn; reopening starts the next one on a line of its own
            self._close()
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            info = os.fstat(fd)
            self._size = info.st_size if stat.S_ISREG(info.st_mode) else 0
            if self._size and os.pread(fd, 1, self._size - 1) != b"\n":
                self._size += os.write(fd, b"\n")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _rotate(self) -> None:
        """audit.jsonl -> .1 -> .2 ... -> .<keep>; what was .<keep> is dropped."""
        self._close()
        for index in range(self.keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(rotated(self.path, index), rotated(self.path, index + 1))
        os.replace(self.path, rotated(self.path, 1))
        for index in rotated_indices(self.path):
            if index > self.keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(rotated(self.path, index))

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _failed(self, exc: Exception) -> None:
        self._close()
        message = describe(exc, self.path)
        self.errors += 1
        self.last_error, self.last_error_at = message, self._clock()
        self._failing = True
        with contextlib.suppress(Exception):
            self._on_error()
        if message not in self._logged:
            self._logged.add(message)
            log.error("audit log: %s; actions go on unrecorded, and each later event tries "
                      "again", message)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            self._logged.clear()
            log.info("audit log: writing to %s again (%d event(s) could not be written so "
                     "far)", self.path, self.errors)

    # ---- reading -------------------------------------------------------------------------

    def read(self, since: float, limit: int) -> list[Event]:
        """Up to `limit` events with time > since, oldest first, from the rotated files and
        the current one. Corrupt or partial lines are skipped."""
        with self.reader(since) as found:
            return found.take(limit)

    def reader(self, since: float) -> EventReader:
        """The events with time > since, oldest first, to be taken a batch at a time (the
        API streams them); close it, or use it as a context manager."""
        with self._lock:
            # open under the lock: a rotation cannot shift the files between two opens,
            # and the open descriptors still read their file after one. Nothing else
            # is done under it: a read never holds up the writer, nor the controller
            # that the writer serves.
            files = list(_open_regular(reversed(self._newest_first())))
        return EventReader(files, since)

    def _newest_first(self) -> list[Path]:
        return [self.path] + [rotated(self.path, i) for i in sorted(rotated_indices(self.path))]


class EventReader:
    """The events after `since` in these files (oldest first). A file whose newest event
    is not after `since` is skipped unread, and in the first file that has later ones
    the read starts near the first of them, found by bisecting the file on its lines'
    times (so a read of the last minute of a 10 MB log parses a few lines, not all of
    them). Times are taken to grow along the log: were the clock stepped back, a read
    from just before the step could miss events written after it."""

    def __init__(self, files: list[BinaryIO], since: float):
        self._files = files
        self._since = since
        self._found = self._events()

    def take(self, count: int) -> list[Event]:
        return list(islice(self._found, count))

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _events(self) -> Iterator[Event]:
        since = self._since
        for f in self._files:
            if _last_time(f) <= since:
                continue
            for event in _events(f, _first_after(f, since)):
                if event["time"] > since:
                    yield event


def encode(event: Event) -> bytes:
    """One line; JSON escapes every newline inside strings, so it stays one line."""
    return (json.dumps(event, ensure_ascii=False, default=str) + "\n").encode()


def describe(exc: Exception, path: Path) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot write {exc.filename or path}: {exc.strerror}"
    return f"cannot write {path}: {exc}"


def rotated(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def rotated_indices(path: Path) -> list[int]:
    """The N of every `path`.N beside it."""
    found = []
    prefix = path.name + "."
    with contextlib.suppress(OSError):
        for name in os.listdir(path.parent):
            suffix = name.removeprefix(prefix)
            if name.startswith(prefix) and suffix.isdigit():
                found.append(int(suffix))
    return found


def parse(line: bytes) -> Event | None:
    """An event, or None for a line that is not one (corrupt, partial, foreign)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    when, seq = event.get("time"), event.get("seq")
    if isinstance(when, bool) or not isinstance(when, int | float):
        return None
    if isinstance(seq, bool) or not isinstance(seq, int):
        return None
    return event


def _open_regular(paths: Iterable[Path]) -> Iterator[BinaryIO]:
    """The paths that are regular files, opened; a device such as /dev/full would read
    forever."""
    for path in paths:
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed by the caller)
        except OSError:
            continue
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            yield f
        else:
            f.close()


#: below this many bytes, bisecting stops and lines are read one by one
SCAN_BYTES = 16 * 1024


def _first_after(f: BinaryIO, since: float) -> int:
    """An offset of a line start before which every event has time <= since (if times
    grow along the file): where to start reading for the events after `since`."""
    lo, hi = 0, os.fstat(f.fileno()).st_size
    while hi - lo > SCAN_BYTES:
        mid = (lo + hi) // 2
        f.seek(mid)
        f.readline()  # on to the next line start
        event, end = None, f.tell()
        while event is None and end < hi:
            event = parse(f.readline())
            end = f.tell()
        if event is None or event["time"] > since:  # (None: nothing readable in [mid, hi))
            hi = mid
        else:
            lo = end
    return lo


def _events(f: BinaryIO, start: int = 0) -> Iterator[Event]:
    f.seek(start)
    for line in f:
        event = parse(line)
        if event is not None:
            yield event


def _tail(f: BinaryIO) -> list[Event]:
    """The events in the last TAIL_BYTES of a file."""
    size = os.fstat(f.fileno()).st_size
    start = max(0, size - TAIL_BYTES)
    f.seek(start)
    lines = f.read(size - start).split(b"\n")
    if start > 0:
        lines = lines[1:]  # begins mid-line
    return [e for e in map(parse, lines) if e is not None]


def _last_time(f: BinaryIO) -> float:
    """The newest time in a file's tail; +inf when none is found there, so the file is
    read in full rather than skipped."""
    times = [float(e["time"]) for e in _tail(f)]
    return max(times) if times else float("inf")


def last_seq(newest_first: Iterable[Path]) -> int:
    """The seq of the newest event in the first of these files that has one; 0 if none."""
    for path in newest_first:
        for f in _open_regular([path]):
            with f:
                events = _tail(f)
            if events:
                return max(int(e["seq"]) for e in events)
    return 0
