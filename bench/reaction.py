"""2. Reaction time: from a fixture temperature file crossing a rule's line (for = 0) to
the job being stopped, and back to running after it clears; 50 trips at interval 0.25 s,
in signal mode (state T in /proc/PID/stat) and cgroup mode (the cgroup reports itself
frozen: a frozen task shows S or D, never T)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import Row, children, daemon, percentile, workdir
from tests.support.processes import BUSY, state
from tests.support.ttar import unpack

INTERVAL = 0.25
PACKAGE = "devices/platform/coretemp.0/hwmon/hwmon0/temp1_input"


def frozen_check(cgroup: Path) -> Callable[[], bool]:
    events, freezer = cgroup / "cgroup.events", cgroup / "freezer.state"
    if events.exists():
        return lambda: "frozen 1" in events.read_text()
    return lambda: freezer.read_text().strip() == "FROZEN"


def wait_for(check: Callable[[], bool], limit: float = 5.0) -> float:
    began = time.perf_counter()
    while not check():
        if time.perf_counter() - began > limit:
            raise TimeoutError("no reaction within 5 s")
        time.sleep(0.0005)
    return time.perf_counter() - began


def trips(mode: str, count: int) -> tuple[list[float], list[float]]:
    with workdir(f"reaction-{mode}") as path:
        unpack(Path(__file__).resolve().parents[1] / "tests/fixtures/sys.ttar", path)
        sensor = path / "sys" / PACKAGE
        config = {"daemon": {"interval": INTERVAL},
                  "sources": {"sysfs_root": str(path / "sys"), "nvml": "off"},
                  "rules": [{"name": "hot", "metric": "cpu_temperature_celsius",
                             "match": {"chip": "platform_coretemp_0",
                                       "sensor": "Package id 0"},
                             "above": 80.0, "for": 0, "clear_below": 70.0, "clear_for": 0,
                             "action": "pause"}]}
        with children(BUSY) as (child,), daemon(path, config) as d:
            job = d.register(name="reacting", pid=child.pid, mode=mode)
            if mode == "signal":
                def stopped() -> bool:
                    return state(child.pid) == "T"
            else:
                stopped = frozen_check(Path(job["cgroup"]))
            rng = random.Random(6)
            to_stop, to_run = [], []
            for _ in range(count):
                time.sleep(rng.uniform(0.05, INTERVAL))  # a random phase of the round grid
                sensor.write_text("95000\n")
                to_stop.append(wait_for(stopped))
                time.sleep(rng.uniform(0.05, INTERVAL))
                sensor.write_text("50000\n")
                to_run.append(wait_for(lambda: not stopped()))
    return to_stop, to_run


def run(quick: bool) -> list[Row]:
    rows = []
    limit = INTERVAL + 0.050
    for mode in ("signal", "cgroup"):
        to_stop, to_run = trips(mode, 10 if quick else 50)
        both = to_stop + to_run
        p50, p99 = percentile(both, 50), percentile(both, 99)
        rows.append(Row(
            f"2. reaction, {mode} mode",
            f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms",
            "thermald 4 s, kubelet 10 s, DCGM 10 s (polling periods)", "-",
            f"p99 <= {limit * 1000:.0f} ms", p99 <= limit,
            {"trips": len(to_stop), "stop_p99_ms": percentile(to_stop, 99) * 1000,
             "run_p99_ms": percentile(to_run, 99) * 1000, "max_ms": max(both) * 1000}))
    return rows
