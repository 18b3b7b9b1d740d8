"""The journal in `daemon.state_dir`: registrations, and every hold an actuator has in place.

Actuators write a hold here *before* they act and drop it after they have undone it, so
whatever happens to the daemon, `governor release-all` can read the state directory alone
and undo every stop, freeze, quota and power cap it lists.

Two files, so that a change costs the same with 4 jobs or 4,000 (rewriting the whole
state on each change, under the controller's lock, made registration quadratic):

- `journal.json`, a snapshot of the state, replaced atomically (temp file, fsync,
  rename, fsync of the directory), with a random `log` token;
- `journal.log`, the changes since that snapshot, one JSON line each ("put" or "drop" of
  a job or a hold), appended and fdatasync'd before the change returns. Its first line
  names the snapshot it follows; a log naming another snapshot is stale and ignored.

When the log outgrows a multiple of the snapshot, the state is compacted into a new
snapshot and a fresh log, so a change's amortised cost stays a small multiple of its own
line. A torn last line (a crash mid-write) was never acknowledged and is ignored. A
version 1 journal (the snapshot alone, from an earlier governor) reads as before.

Hold entries are plain JSON so that release-all needs no daemon state to read them;
each actuator module documents the `kind`s it writes and has an `undo(entry)` for them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VERSION = 2
#: snapshot versions this journal reads (1: before the log existed)
READABLE = (1, 2)
LOG_NAME = "journal.log"
#: the log is compacted once it is longer than this many times the snapshot...
COMPACT_FACTOR = 2
#: ...and longer than this, so that a small state is not rewritten every few changes
COMPACT_MIN_BYTES = 256 * 1024

Table = dict[str, dict[str, Any]]


class Journal:
    def __init__(self, state_dir: str | os.PathLike[str]):
        self.dir = Path(state_dir)
        self.path = self.dir / "journal.json"
        self.log_path = self.dir / LOG_NAME
        self._lock = threading.Lock()
        self._jobs: Table = {}
        self._holds: Table = {}
        #: the changes the next _write makes durable
        self._pending: list[dict[str, Any]] = []
        #: the log this journal appends to; None until its first write (which compacts,
        #: so that what is on disk is this journal's state) or after a failed one
        self._log_fd: int | None = None
        self._log_size = 0
        self._snapshot_size = 0
        #: bytes handed to write(2), snapshots and log lines together (bench 9 reads it)
        self.bytes_written = 0

    def load(self) -> list[str]:
        """Read the journal left by an earlier run. Returns what could not be read, in
        sentences; a corrupt snapshot is kept beside as journal.json.corrupt-<n>."""
        problems: list[str] = []
        # the log first: a compaction between the two reads then leaves a log older than
        # the snapshot, which names another snapshot and is skipped
        try:
            log_data: bytes | None = self.log_path.read_bytes()
        except FileNotFoundError:
            log_data = None
        except OSError as exc:
            log_data = None
            problems.append(f"cannot read {self.log_path}: {exc.strerror}")
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return problems
        except OSError as exc:
            return [*problems, f"cannot read {self.path}: {exc.strerror}"]
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") not in READABLE:
                raise ValueError(f"not a version {VERSION} journal")
            jobs, holds = data.get("jobs", {}), data.get("holds", {})
            if not isinstance(jobs, dict) or not isinstance(holds, dict):
                raise ValueError("jobs and holds must be objects")
        except ValueError as exc:
            keep = self._keep_corrupt()
            problems.append(f"{self.path} is unreadable ({exc}); kept a copy as {keep}")
            return problems
        tables: dict[str, Table] = {
            "jobs": {str(k): v for k, v in jobs.items() if isinstance(v, dict)},
            "holds": {str(k): v for k, v in holds.items() if isinstance(v, dict)}}
        token = data.get("log")
        if log_data is not None and isinstance(token, str):
            problems += self._replay(log_data, token, tables)
        with self._lock:
            self._jobs, self._holds = tables["jobs"], tables["holds"]
        return problems

    def _replay(self, data: bytes, token: str, tables: dict[str, Table]) -> list[str]:
        """Apply the log's changes, if it follows this snapshot. The last line, if it has
        no newline, was torn by a crash before its change was acknowledged: ignored."""
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the log ends with a newline
        if torn:
            log.info("%s: ignoring a torn last line (%d bytes)", self.log_path, len(torn))
        if not lines or _header(lines[0]) != token:
            return []
        problems = []
        for number, line in enumerate(lines[1:], start=2):
            change = _change(line)
            if change is None:
                problems.append(f"{self.log_path}: line {number} is unreadable; skipped")
                continue
            table, key, value = change
            if value is None:
                tables[table].pop(key, None)
            else:
                tables[table][key] = value
        return problems

    def _keep_corrupt(self) -> Path:
        n = 0
        while (keep := self.path.with_name(f"journal.json.corrupt-{n}")).exists():
            n += 1
        os.replace(self.path, keep)
        return keep

    # ---- reading ----

    def jobs(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._jobs.items()}

    def holds(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._holds.items()}

    # ---- writing: each call is durable when it returns ----

    def put_job(self, job_id: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._change("jobs", job_id, record)

    def drop_job(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._jobs:
                self._change("jobs", job_id, None)

    def put_hold(self, key: str, entry: dict[str, Any]) -> None:
        with self._lock:
            if self._holds.get(key) == entry:
                return
            self._change("holds", key, entry)

    def drop_hold(self, key: str) -> None:
        with self._lock:
            if key in self._holds:
                self._change("holds", key, None)

    def close(self) -> None:
        with self._lock:
            self._close_log()

    def _change(self, table: str, key: str, value: dict[str, Any] | None) -> None:
        """Change the state and make it durable; if that fails, the state is as before
        (what is in memory is what is on disk), and the error is raised."""
        rows = self._jobs if table == "jobs" else self._holds
        before = rows.get(key)
        if value is None:
            rows.pop(key, None)
            self._pending.append({"op": "drop", "table": table, "key": key})
        else:
            rows[key] = value
            self._pending.append({"op": "put", "table": table, "key": key, "value": value})
        try:
            self._write()
        except BaseException:
            if before is None:
                rows.pop(key, None)
            else:
                rows[key] = before
            raise
        finally:
            self._pending.clear()

    def _write(self) -> None:
        """Make the pending changes durable: one append and fdatasync, or a compaction."""
        lines = b"".join(_line(change) for change in self._pending)
        if self._must_compact(len(lines)):
            self._compact()
            return
        assert self._log_fd is not None
        try:
            _write_all(self._log_fd, lines)
            os.fdatasync(self._log_fd)
        except BaseException:
            # a part of a line may be on disk: the next change starts a fresh log
            self._close_log()
            raise
        self._log_size += len(lines)
        self.bytes_written += len(lines)

    def _must_compact(self, more: int) -> bool:
        if self._log_fd is None:
            return True
        if self._log_size + more > max(COMPACT_MIN_BYTES, COMPACT_FACTOR * self._snapshot_size):
            return True
        # someone else (release-all, while this daemon runs) compacted: appending to the
        # log they replaced would write changes no reader sees
        try:
            on_disk, ours = os.stat(self.log_path), os.fstat(self._log_fd)
        except OSError:
            return True
        return (on_disk.st_dev, on_disk.st_ino) != (ours.st_dev, ours.st_ino)

    def _compact(self) -> None:
        """The whole state into a new snapshot, then a fresh log that names it. The
        snapshot is durable before the log is replaced: a crash between the two leaves
        the new snapshot and the old log, which names the old one and is ignored."""
        self._close_log()
        self.dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        body = json.dumps({"version": VERSION, "log": token, "jobs": self._jobs,
                           "holds": self._holds}, indent=1, sort_keys=True).encode()
        self._replace(self.path, body)
        header = _line({"journal": VERSION, "log": token})
        self._replace(self.log_path, header)
        self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._log_size, self._snapshot_size = len(header), len(body)

    def _replace(self, path: Path, body: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".journal-", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.bytes_written += len(body)
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _close_log(self) -> None:
        if self._log_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._log_fd)
            self._log_fd = None


def _line(record: dict[str, Any]) -> bytes:
    """One line: JSON escapes every newline inside strings."""
    return (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _header(line: bytes) -> str | None:
    """The snapshot token a log's first line names, or None."""
    try:
        header = json.loads(line)
    except ValueError:
        return None
    token = header.get("log") if isinstance(header, dict) else None
    return token if isinstance(token, str) else None


def _change(line: bytes) -> tuple[str, str, dict[str, Any] | None] | None:
    """(table, key, value) of a log line (value None: a drop), or None if it is not
    one."""
    try:
        change = json.loads(line)
    except ValueError:
        return None
    if not isinstance(change, dict):
        return None
    op, table, key, value = (change.get("op"), change.get("table"), change.get("key"),
                             change.get("value"))
    if op not in ("put", "drop") or table not in ("jobs", "holds") or not isinstance(key, str):
        return None
    if op == "put" and not isinstance(value, dict):
        return None
    return table, key, value if op == "put" else None
