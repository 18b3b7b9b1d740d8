"""A job that uses a fixed share of a CPU core, for the simulated GPU's `busy_cores`: the
plant then heats by how much governor lets the job run, not by how much CPU a shared
machine happens to give a process that wants a whole core."""

from __future__ import annotations

#: the pacing period, seconds: short beside a round, long beside a scheduler tick
PERIOD = 0.02


def paced_job(cores: float) -> str:
    """Python source (for `python -c`) of a loop that uses `cores` of a core: cores *
    PERIOD seconds of CPU every PERIOD. A period it lost (stopped, or not given the CPU)
    is not made up afterwards, as a GPU's queue of work is not."""
    return ("import time\n"
            f"period, work = {PERIOD!r}, {PERIOD * cores!r}\n"
            "due = time.monotonic()\n"
            "while True:\n"
            "    start = time.process_time()\n"
            "    while time.process_time() - start < work:\n"
            "        pass\n"
            "    due = max(due + period, time.monotonic())\n"
            "    time.sleep(max(0.0, due - time.monotonic()))\n")
