"""A fixture /proc/stat that advances on its own, so CPU utilization is exact."""

from __future__ import annotations

import threading
from pathlib import Path


class StatTicker:
    """Advances the fixture /proc/stat every 20 ms, each core by a fixed share of busy
    jiffies (cpu0 25%, cpu1 50%, cpu2 0%, cpu3 100%), so utilization between any two
    reads is exact, however the rounds fall."""

    SHARES = (25, 50, 0, 100)

    def __init__(self, proc_tree: Path):
        self.stat = proc_tree / "stat"
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _write(self) -> None:
        self.ticks += 1
        lines = []
        for cpu, busy in enumerate(self.SHARES):
            user = 100 + busy * self.ticks
            idle = 750 + (100 - busy) * self.ticks
            lines.append(f"cpu{cpu} {user} 0 50 {idle} 25 0 0 0 0 0")
        tmp = self.stat.with_suffix(".tmp")
        tmp.write_text("cpu  0 0 0 0 0 0 0 0 0 0\n" + "\n".join(lines) + "\n")
        tmp.replace(self.stat)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._write()

    def __enter__(self) -> StatTicker:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
