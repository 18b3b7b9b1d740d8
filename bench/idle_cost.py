"""8. Idle cost: what the daemon costs the machine at the settings users run, the default
1 s interval, over a minute: CPU milliseconds per second (utime + stime of the daemon and
its threads, /proc/PID/stat) and wake-ups per second (voluntary and involuntary context
switches summed over /proc/PID/task/*/status), with no scrape at all and with a scrape of
/metrics every 15 s (Prometheus's default). 32 hwmon sensors, 8 GPUs through the C fake
NVML (the real pynvml, LD_LIBRARY_PATH), 16 registered jobs (signal mode)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import Row, build_sysfs, children, eight_gpus, metric, workdir
from bench.round_cost import QUIET_RULES
from tests.support.c_nvml import CNvmlState
from tests.support.daemon import DaemonProcess

TARGET_MS_PER_S = 2.0
SCRAPE_EVERY = 15.0
TICK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[int, tuple[str, float, int]]:
    """Each live thread: a name (Python leaves the OS's thread names alone: "main" or
    its thread id), CPU seconds (schedstat's, in ns, finer than stat's ticks) and
    context switches so far."""
    found: dict[int, tuple[str, float, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpu = int((task / "schedstat").read_text().split()[0]) / 1e9
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
        name = "main" if int(task.name) == pid else f"thread {task.name}"
        switches = sum(int(line.split()[1]) for line in status.splitlines()
                       if line.startswith(("voluntary_ctxt_switches",
                                           "nonvoluntary_ctxt_switches")))
        found[int(task.name)] = (name, cpu, switches)
    return found


def process_cpu(pid: int) -> float:
    """utime + stime of the whole process (every thread, the ended ones too), seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def measure(d: DaemonProcess, seconds: float, scrape: bool) -> dict[str, Any]:
    """CPU ms per second, wake-ups per second and each thread's share over one window."""
    assert d.proc is not None
    pid = d.proc.pid
    rounds0 = metric(d.url, "governor_rounds_total")
    time.sleep(1.0)  # that scrape's work is done before the window opens
    scrapes = 0
    tasks0, cpu0, began = threads(pid), process_cpu(pid), time.monotonic()
    end = began + seconds
    with httpx.Client(timeout=10) as client:
        next_scrape = began
        while (now := time.monotonic()) < end:
            if scrape and now >= next_scrape:
                client.get(d.url + "/metrics").raise_for_status()
                scrapes += 1
                next_scrape += SCRAPE_EVERY
            time.sleep(max(0.0, min(end, next_scrape if scrape else end) - time.monotonic()))
    tasks1, cpu1, elapsed = threads(pid), process_cpu(pid), time.monotonic() - began
    rounds = metric(d.url, "governor_rounds_total") - rounds0 - 1  # ~ the window's rounds
    switches = sum(s for _, _, s in tasks1.values()) - sum(
        s for tid, (_, _, s) in tasks0.items() if tid in tasks1)
    per_thread: dict[str, dict[str, float]] = {}
    for tid, (name, cpu, s) in tasks1.items():
        _, cpu_before, s_before = tasks0.get(tid, (name, 0.0, 0))
        mine = per_thread.setdefault(name, {"cpu_ms_per_s": 0.0, "wakeups_per_s": 0.0})
        mine["cpu_ms_per_s"] += (cpu - cpu_before) * 1000 / elapsed
        mine["wakeups_per_s"] += (s - s_before) / elapsed
    return {
        "seconds": elapsed,
        "scrapes": scrapes,
        "rounds": int(rounds),
        "cpu_ms_per_s": (cpu1 - cpu0) * 1000 / elapsed,
        "wakeups_per_s": switches / elapsed,
        "threads": {k: {m: round(v, 2) for m, v in t.items()}
                    for k, t in sorted(per_thread.items())},
    }


def idle_cost(seconds: float, env: dict[str, str] | None = None,
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The daemon at its default interval: one window unscraped, one scraped every 15 s.
    `env` adds to the daemon's environment (a profiler's hook)."""
    with workdir("idle") as path:
        sys_root = build_sysfs(path)
        nvml = CNvmlState(path / "nvml.state", log_calls=False)
        nvml.write(eight_gpus())
        config = {"sources": {"sysfs_root": str(sys_root), "nvml": "auto"},
                  "rules": QUIET_RULES}  # no [daemon] interval: the default, 1 s
        (path / "d").mkdir()
        d = DaemonProcess(path / "d", config, env=env, c_nvml=nvml)
        with children(*[["sleep", "3600"]] * 16) as kids:
            d.start()
            try:
                for i, kid in enumerate(kids):
                    d.register(name=f"job{i}", pid=kid.pid, devices=[f"gpu{i % 8}"])
                assert metric(d.url, "governor_gpu_temperature_celsius") > 0
                time.sleep(3.0)
                idle = measure(d, seconds, scrape=False)
                scraped = measure(d, seconds, scrape=True)
            finally:
                d.stop()
    return idle, scraped


def run(quick: bool) -> list[Row]:
    idle, scraped = idle_cost(20 if quick else 60)
    worst = max(idle["cpu_ms_per_s"], scraped["cpu_ms_per_s"])
    return [Row(
        "8. idle cost at 1 s (CPU, wake-ups)",
        f"{idle['cpu_ms_per_s']:.2f} ms/s idle, {scraped['cpu_ms_per_s']:.2f} ms/s "
        f"scraped every {SCRAPE_EVERY:g} s; {idle['wakeups_per_s']:.1f} and "
        f"{scraped['wakeups_per_s']:.1f} wake-ups/s",
        "-", "-", f"<= {TARGET_MS_PER_S:g} ms/s", worst <= TARGET_MS_PER_S,
        {"idle": idle, "scraped": scraped})]
