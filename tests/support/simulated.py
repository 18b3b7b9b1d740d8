"""What the simulated GPU's tests share: a clock they move by hand, and /proc/PID/stat
files whose CPU ticks they set (the simulator heats by the CPU its jobs used)."""

from __future__ import annotations

from pathlib import Path


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write_stat(proc: Path, pid: int, ticks: int, started: int = 5000) -> None:
    (proc / str(pid)).mkdir(parents=True, exist_ok=True)
    fields = ["S"] + ["0"] * 10 + [str(ticks), "0"] + ["0"] * 6 + [str(started)] + ["0"] * 30
    (proc / str(pid) / "stat").write_text(f"{pid} (job (one)) {' '.join(fields)}\n")
