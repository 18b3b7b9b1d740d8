"""3. Throttling accuracy: a 1-thread and a 2-thread busy job held at speeds 0.25, 0.5,
0.75 for 10 s each, in signal and in cgroup mode, and the same job under `cpulimit -l`
one after the other in the same run.

Speed s means the job keeps s of what it uses running free, measured for 2 s just before
each hold (about 1 core for one thread; for two, 2 less what else on the 2 cores takes:
what the job can have free changes with the machine's load, so it is measured next to
each hold, not once for the run). Errors are in points of a core: mean error = mean
cores used - target; window deviation = the standard deviation of the 0.5 s windows;
settling = the end of the first window within 2 points of the target, from the moment the
hold began (the job seen slowed, or cpulimit started). Each hold starts from a job
running free.

CPU time is the threads' own, from /proc/PID/task/*/schedstat in nanoseconds, not
utime + stime from /proc/PID/stat: those count clock ticks (10 ms), which in a 0.5 s
window of a 2-thread job is 2 points of a core per tick a thread is off by, and as
much spread as the 2-point target allows."""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Row, children, daemon, ensure_peer, workdir
from tests.support.daemon import DaemonProcess, to_toml
from tests.support.processes import BUSY, favour
from tests.support.ttar import unpack

SPEEDS = (0.25, 0.5, 0.75)
WINDOW = 0.5
PACKAGE = "devices/platform/coretemp.0/hwmon/hwmon0/temp1_input"
#: two threads in one process that really use two cores: sha256 of a large buffer
#: releases the GIL
TWO_THREADS = [sys.executable, "-c", (
    "import hashlib, threading\n"
    "data = b'x' * (1 << 22)\n"
    "def spin():\n"
    "    while True:\n"
    "        hashlib.sha256(data).digest()\n"
    "for _ in range(2):\n"
    "    threading.Thread(target=spin).start()\n")]
JOBS = {"1-thread": BUSY, "2-thread": TWO_THREADS}


@dataclass
class Hold:
    mean_error: float
    deviation: float
    settling: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"mean_error_points": self.mean_error, "window_sd_points": self.deviation,
                "settling_s": self.settling}


def cpu_seconds(pid: int) -> float:
    """CPU seconds of the process's live threads, to the nanosecond (the jobs here never
    end a thread)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1e9


def demand(pid: int, seconds: float = 2.0) -> float:
    before, began = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - began)


def windows(pid: int, began: float, seconds: float, target: float) -> Hold:
    """Cores used in consecutive windows from `began`, judged against `target` cores."""
    used = []
    last = cpu_seconds(pid)
    last_at = began
    for k in range(1, int(seconds / WINDOW) + 1):
        time.sleep(max(0.0, began + k * WINDOW - time.monotonic()))
        now, at = cpu_seconds(pid), time.monotonic()
        used.append((now - last) / (at - last_at))
        last, last_at = now, at
    points = [(u - target) * 100 for u in used]
    settled = next((i for i, p in enumerate(points) if abs(p) <= 2.0), None)
    return Hold(mean_error=statistics.fmean(points), deviation=statistics.pstdev(points),
                settling=None if settled is None else (settled + 1) * WINDOW)


def governor_holds(mode: str, argv: list[str], seconds: float,
                   speeds: tuple[float, ...]) -> dict[float, Hold]:
    with workdir(f"accuracy-{mode}") as path:
        unpack(Path(__file__).resolve().parents[1] / "tests/fixtures/sys.ttar", path)
        sensor = path / "sys" / PACKAGE

        def config(speed: float) -> dict[str, Any]:
            return {"daemon": {"interval": 0.1},
                    "sources": {"sysfs_root": str(path / "sys"), "nvml": "off"},
                    "rules": [{"name": "hot", "metric": "cpu_temperature_celsius",
                               "match": {"chip": "platform_coretemp_0",
                                         "sensor": "Package id 0"},
                               "above": 80.0, "for": 0, "clear_below": 70.0, "clear_for": 0,
                               "action": "slow", "speed": speed}]}

        results = {}
        with children(argv) as (child,), daemon(path, config(speeds[0])) as d:
            favour([child.pid])
            job = d.register(name="accuracy", pid=child.pid, mode=mode)
            for speed in speeds:
                write_config(d, config(speed))
                free = demand(child.pid)
                sensor.write_text("95000\n")
                began = wait_state(d, job["id"], "slowed")
                results[speed] = windows(child.pid, began, seconds, speed * free)
                sensor.write_text("50000\n")
                wait_state(d, job["id"], "running")
                time.sleep(1.0)
    return results


def write_config(d: DaemonProcess, config: dict[str, Any]) -> None:
    d.config_path.write_text(to_toml({**config, "api": {
        "listen": f"127.0.0.1:{d.port}", "token_file": str(d.token_path)},
        "daemon": {**config["daemon"], "state_dir": str(d.workdir / "state")}}))
    d.call("POST", "/v1/reload").raise_for_status()


def wait_state(d: DaemonProcess, job_id: str, wanted: str) -> float:
    while d.job(job_id)["state"] != wanted:
        time.sleep(0.005)
    return time.monotonic()


def cpulimit_holds(binary: str, argv: list[str], seconds: float,
                   speeds: tuple[float, ...]) -> dict[float, Hold]:
    results = {}
    with children(argv) as (child,):
        favour([child.pid])
        for speed in speeds:
            free = demand(child.pid)
            limit = max(1, round(speed * free * 100))
            limiter = subprocess.Popen([binary, "-p", str(child.pid), "-l", str(limit), "-q"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            began = time.monotonic()
            results[speed] = windows(child.pid, began, seconds, speed * free)
            limiter.terminate()
            limiter.wait(10)
            child.send_signal(signal.SIGCONT)  # cpulimit may exit mid stop
            time.sleep(1.0)
    return results


def summary(holds: dict[float, Hold]) -> tuple[float, float, float | None]:
    """Worst mean error, worst deviation, worst settling over the speeds."""
    worst_error = max(abs(h.mean_error) for h in holds.values())
    worst_sd = max(h.deviation for h in holds.values())
    settlings = [h.settling for h in holds.values()]
    worst_settle = None if None in settlings else max(s for s in settlings if s is not None)
    return worst_error, worst_sd, worst_settle


def describe(holds: dict[float, Hold]) -> str:
    error, sd, settle = summary(holds)
    settled = "never" if settle is None else f"{settle:.1f} s"
    return f"err {error:.1f} pt, sd {sd:.1f} pt, settle {settled}"


def run(quick: bool) -> list[Row]:
    seconds = 3.0 if quick else 10.0
    speeds = (0.5,) if quick else SPEEDS
    binary, note = ensure_peer("cpulimit", "cpulimit")
    rows = []
    for kind, argv in JOBS.items():
        peer = cpulimit_holds(binary, argv, seconds, speeds) if binary else None
        for mode in ("signal", "cgroup"):
            mine = governor_holds(mode, argv, seconds, speeds)
            error, sd, settle = summary(mine)
            passed = error <= 1.0 and sd < 2.0 and settle is not None and settle <= 0.5
            details: dict[str, Any] = {f"governor_{s}": h.as_dict() for s, h in mine.items()}
            if peer is not None:
                details.update({f"cpulimit_{s}": h.as_dict() for s, h in peer.items()})
                peer_text = "cpulimit " + describe(peer)
                peer_settle = summary(peer)[2]
                ratio = ("-" if settle is None or peer_settle is None else
                         f"settles {peer_settle / settle:.1f}x sooner")
            else:
                peer_text, ratio = note, "-"
            rows.append(Row(f"3. accuracy, {kind}, {mode} mode", describe(mine), peer_text,
                            ratio, "err <= 1 pt, sd < 2 pt, settle <= 0.5 s", passed, details))
    return rows
