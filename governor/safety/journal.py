"""The journal in `daemon.state_dir`: registrations, and every hold an actuator has in place.

Actuators write a hold here *before* they act and drop it after they have undone it, so
whatever happens to the daemon, `governor release-all` can read this file alone and
undo every stop, freeze, quota and power cap it lists. Each write replaces the whole file
atomically (temp file, fsync, rename, fsync of the directory): a reader sees the old
state or the new one, never half of each.

Hold entries are plain JSON so that release-all needs no daemon state to read them;
each actuator module documents the `kind`s it writes and has an `undo(entry)` for them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VERSION = 1


class Journal:
    def __init__(self, state_dir: str | os.PathLike[str]):
        self.dir = Path(state_dir)
        self.path = self.dir / "journal.json"
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, Any]] = {}
        self._holds: dict[str, dict[str, Any]] = {}

    def load(self) -> list[str]:
        """Read the journal left by an earlier run. Returns what could not be read, in
        sentences; a corrupt file is kept beside as journal.json.corrupt-<n>."""
        problems: list[str] = []
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return problems
        except OSError as exc:
            return [f"cannot read {self.path}: {exc.strerror}"]
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError(f"not a version {VERSION} journal")
            jobs, holds = data.get("jobs", {}), data.get("holds", {})
            if not isinstance(jobs, dict) or not isinstance(holds, dict):
                raise ValueError("jobs and holds must be objects")
        except ValueError as exc:
            keep = self._keep_corrupt()
            problems.append(f"{self.path} is unreadable ({exc}); kept a copy as {keep}")
            return problems
        with self._lock:
            self._jobs = {str(k): v for k, v in jobs.items() if isinstance(v, dict)}
            self._holds = {str(k): v for k, v in holds.items() if isinstance(v, dict)}
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
            self._jobs[job_id] = record
            self._write()

    def drop_job(self, job_id: str) -> None:
        with self._lock:
            if self._jobs.pop(job_id, None) is not None:
                self._write()

    def put_hold(self, key: str, entry: dict[str, Any]) -> None:
        with self._lock:
            if self._holds.get(key) == entry:
                return
            self._holds[key] = entry
            self._write()

    def drop_hold(self, key: str) -> None:
        with self._lock:
            if self._holds.pop(key, None) is not None:
                self._write()

    def _write(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"version": VERSION, "jobs": self._jobs, "holds": self._holds},
                          indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(prefix=".journal-", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

