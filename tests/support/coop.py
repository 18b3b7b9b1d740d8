"""A cooperative worker process (tests/support/coop_worker.py) and its trace, read back."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support.processes import eventually


class Worker:
    """A coop_worker process and its trace."""

    def __init__(self, trace: Path, process: subprocess.Popen[bytes]):
        self.trace = trace
        self.process = process

    def events(self) -> list[dict[str, Any]]:
        if not self.trace.exists():
            return []
        lines = self.trace.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == event]

    def steps(self) -> int:
        done = self.named("step")
        return done[-1]["step"] if done else 0

    def wait_for(self, event: str, count: int = 1, timeout: float = 15.0) -> dict[str, Any]:
        eventually(lambda: len(self.named(event)) >= count, timeout,
                   what=f"{event!r} in the trace ({self.trace.read_text()[-3000:]!r})"
                   if self.trace.exists() else event)
        return self.named(event)[count - 1]

    def job_id(self) -> str:
        ids = [e["job"] for e in self.events() if e["event"] in ("start", "registered")
               and e.get("job")]
        assert ids, self.events()
        return str(ids[-1])

    def share(self, seconds: float) -> float:
        """The share of the next `seconds` of wall time the job spent in its steps."""
        began = time.monotonic()
        time.sleep(seconds)
        ended = time.monotonic()
        busy = sum(max(0.0, min(e["ended"], ended) - max(e["began"], began))
                   for e in self.named("step"))
        return busy / (ended - began)

    def between(self, first: dict[str, Any], last: dict[str, Any] | None) -> list[str]:
        """The events from `first` up to `last` (None: to the end), in order."""
        events = self.events()
        start = events.index(first)
        end = events.index(last) if last is not None else len(events)
        return [e["event"] for e in events[start:end + 1]]
