"""9. How cost grows: the daemon's CPU per round against the number of GPUs (1, 8, 64,
through the C fake NVML under the real pynvml), of registered jobs (16, 256, 1,000) and of
hwmon sensors (8, 32, 256), each axis varied from the same base node (8 GPUs, 16 jobs,
32 sensors); and the latency of a /metrics scrape against the series it exposes, at
every one of those sizes.

How it is measured. A daemon subprocess per size, as users run it (`governor run`, the
real binding over `libnvidia-ml.so.1`, real sleeping children registered through the REST
API in signal mode). Its CPU is read from /proc/PID/task/*/schedstat (nanoseconds, every
thread) over a window with no scrape, and divided by the rounds the window held. The rules
are `round_cost.QUIET_RULES`: configured on every GPU and CPU series, thresholds never
reached, so the policy evaluates every rule and decides every job each round, yet no job
is held and no signal is sent; holding jobs would add signals and cgroup writes, which grow
with the jobs held, not with the node, and which rows 2 to 4 measure.

The interval is 0.25 s, not the default 1 s, so the seven nodes fit in ~5 minutes. A
round's work (read every sensor, step every rule, decide every job) does not depend on the
interval; what does is the cost of waking cold threads, a fixed ~1 ms a round at 1 s
(row 8's note), the same at every size, which lowers every slope a little rather than
raising one. A full run measures the base node at 1 s as well, to show the difference
(3 December 2026: 3.64 ms a round at 1 s against 2.84 ms at 0.25 s, +0.8 ms, the cold
wake-up; every size would pay the same).

Which term dominates. The daemon already exposes each sampler's duration
(`governor_sample_duration_seconds{sampler}`, wall time of its last read) and the round's
(`governor_round_duration_seconds`); the scrapes after the window, one per round, average
them, and the round's remainder (its duration less its samplers') is the control step:
publishing the snapshot, the rules, the directives, the jobs' liveness. These are wall
times on a lightly loaded machine, so they divide the round rather than price it; the
price is the CPU figure. The exposition's cost is the scrape's daemon CPU, apart.

A row passes when no cost grows faster than linearly: each step's log-log slope at most
1.1; the scrape's, the least-squares slope through every node measured (one step in
series, 265 to 301 between 8 and 32 sensors, is too small to take a slope of alone).

The jobs axis uses one daemon: 16 jobs registered, measured, then registered up to 256
and 1,000 and measured again. `--quick` measures jobs at 16/64/256 with short windows,
to check the benchmark itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import httpx

from bench.common import Row, build_sysfs, children, metric, percentile, workdir
from bench.idle_cost import threads
from bench.round_cost import QUIET_RULES
from tests.support.c_nvml import CNvmlState
from tests.support.daemon import DaemonProcess
from tests.support.fake_nvml import h100

INTERVAL = 0.25
#: the largest slope between two sizes that still counts as linear (noise allowance)
LINEAR = 1.1
#: hwmon chips in the tree; the sensors are spread over them
CHIPS = 8


@dataclass(frozen=True)
class Size:
    gpus: int = 8
    jobs: int = 16
    sensors: int = 32

    @property
    def key(self) -> str:
        return f"{self.gpus} GPUs, {self.jobs} jobs, {self.sensors} sensors"


BASE = Size()
AXES: dict[str, tuple[str, list[Size]]] = {
    "GPUs": ("gpus", [Size(gpus=1), BASE, Size(gpus=64)]),
    "jobs": ("jobs", [BASE, Size(jobs=256), Size(jobs=1000)]),
    "sensors": ("sensors", [Size(sensors=8), BASE, Size(sensors=256)]),
}


def gpus(count: int) -> dict[str, Any]:
    """`count` H100s, temperatures spread so the series differ."""
    return {"gpus": [h100(i, temperature=50 + i % 30) for i in range(count)]}


def schedstat_cpu(pid: int) -> dict[int, float]:
    return {tid: cpu for tid, (_, cpu, _) in threads(pid).items()}


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the daemon's threads used between two readings (a thread that ended
    meanwhile is lost, a new one counts from zero: the daemon's threads are long-lived)."""
    return sum(cpu - before.get(tid, 0.0) for tid, cpu in after.items())


def sampled(text: str) -> tuple[int, dict[str, float], float]:
    """(series in the exposition, each sampler's last duration, the round's duration)."""
    series = 0
    samplers: dict[str, float] = {}
    round_s = float("nan")
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series += 1
        if line.startswith("governor_sample_duration_seconds{"):
            name = line.split('sampler="', 1)[1].split('"', 1)[0]
            samplers[name] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("governor_round_duration_seconds "):
            round_s = float(line.rsplit(" ", 1)[1])
    return series, samplers, round_s


def measure(d: DaemonProcess, window: float, scrapes: int, interval: float) -> dict[str, Any]:
    """One daemon: CPU per round over an unscraped window, then `scrapes` scrapes one
    round apart (each renders afresh: the exposition is cached per snapshot)."""
    assert d.proc is not None
    pid = d.proc.pid
    r0, t0 = metric(d.url, "governor_rounds_total"), time.monotonic()
    time.sleep(min(1.0, 2 * interval))  # the scrape's work is done before the window
    cpu0, w0 = schedstat_cpu(pid), time.monotonic()
    time.sleep(window)
    cpu1, w1 = schedstat_cpu(pid), time.monotonic()
    r1, t1 = metric(d.url, "governor_rounds_total"), time.monotonic()
    rate = (r1 - r0) / (t1 - t0)  # rounds a second, the grid's (overruns would lower it)
    rounds = rate * (w1 - w0)
    round_ms = cpu_between(cpu0, cpu1) * 1000 / rounds

    latencies: list[float] = []
    per_sampler: dict[str, list[float]] = {}
    round_durations: list[float] = []
    series = 0
    time.sleep(interval)
    with httpx.Client(timeout=10) as client:
        cpu2, s0 = schedstat_cpu(pid), time.monotonic()
        for _ in range(scrapes):
            began = time.perf_counter()
            response = client.get(d.url + "/metrics")
            latencies.append(time.perf_counter() - began)
            response.raise_for_status()
            series, samplers, round_s = sampled(response.text)
            for name, seconds in samplers.items():
                per_sampler.setdefault(name, []).append(seconds)
            round_durations.append(round_s)
            time.sleep(interval * 1.05)
        cpu3, s1 = schedstat_cpu(pid), time.monotonic()
    # the scrapes' own CPU: what the daemon used meanwhile less the rounds it ran
    scrape_ms = (cpu_between(cpu2, cpu3) * 1000 - round_ms * rate * (s1 - s0)) / scrapes
    phases = {name: 1000 * sum(v) / len(v) for name, v in sorted(per_sampler.items())}
    round_wall = 1000 * sum(round_durations) / len(round_durations)
    phases["control step"] = max(0.0, round_wall - sum(phases.values()))
    return {
        "window_s": round(w1 - w0, 2),
        "rounds": round(rounds, 1),
        "round_cpu_ms": round_ms,
        "round_wall_ms": round_wall,
        "phases_wall_ms": phases,
        "dominant": max(phases, key=lambda k: phases[k]),
        "series": series,
        "scrapes": scrapes,
        "scrape_p50_ms": percentile(latencies, 50) * 1000,
        "scrape_p99_ms": percentile(latencies, 99) * 1000,
        "scrape_cpu_ms": scrape_ms,
    }


def node(size: Size, window: float, scrapes: int, interval: float = INTERVAL,
         more_jobs: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """One daemon on a node of `size`, measured; then, for each of `more_jobs`, as many
    jobs registered in all (more children, through the API) and measured again: the
    registry after 1,000 registrations is the registry a fresh daemon given 1,000 jobs
    has, and one daemon start is spared per size."""
    counts = [size.jobs, *more_jobs]
    with workdir("scaling") as path:
        sys_root = build_sysfs(path, chips=CHIPS, sensors=max(1, size.sensors // CHIPS))
        nvml = CNvmlState(path / "nvml.state")
        nvml.write(gpus(size.gpus))
        config = {"daemon": {"interval": interval},
                  "sources": {"sysfs_root": str(sys_root), "nvml": "auto"},
                  "rules": QUIET_RULES}
        (path / "d").mkdir()
        d = DaemonProcess(path / "d", config, c_nvml=nvml)
        d.env.pop("FAKE_NVML_LOG", None)  # a driver keeps no log of every call
        found: list[dict[str, Any]] = []
        with children(*[["sleep", "3600"]] * max(counts)) as kids:
            d.start()
            try:
                assert metric(d.url, "governor_gpu_temperature_celsius") > 0
                registered = 0
                for count in counts:
                    for i in range(registered, count):
                        d.register(name=f"job{i}", pid=kids[i].pid,
                                   devices=[f"gpu{i % size.gpus}"])
                    registered = count
                    jobs = sum(1 for line in d.metrics().splitlines()
                               if line.startswith("governor_job_info{"))
                    d.wait_rounds(4)
                    measured = measure(d, window, scrapes, interval)
                    measured["jobs_registered"] = jobs
                    found.append(measured)
                return found
            finally:
                d.stop()


def fit(points: list[tuple[float, float]]) -> float:
    """The least-squares log-log slope through every point."""
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return (sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
            / sum((x - mx) ** 2 for x in xs))


def slope(x0: float, y0: float, x1: float, y1: float) -> float:
    """The log-log slope between two sizes: 1 is linear, 0 flat."""
    return math.log(y1 / y0) / math.log(x1 / x0)


def run(quick: bool) -> list[Row]:
    window, scrapes = (1.0, 3) if quick else (15.0, 30)
    axes = AXES
    if quick:  # fewer children to start and register; the same code measures them
        axes = {**AXES, "jobs": ("jobs", [BASE, Size(jobs=64), Size(jobs=256)])}
    measured: dict[Size, dict[str, Any]] = {}
    jobs_sizes = axes["jobs"][1]
    print(f"   {BASE.key} and up to {jobs_sizes[-1].jobs} jobs ...", flush=True)
    for size, found in zip(jobs_sizes, node(BASE, window, scrapes, more_jobs=tuple(
            s.jobs for s in jobs_sizes[1:])), strict=True):
        measured[size] = found
    for _, (_, sizes) in axes.items():
        for size in sizes:
            if size not in measured:
                print(f"   {size.key} ...", flush=True)
                measured[size] = node(size, window, scrapes)[0]
    rows: list[Row] = []
    table: list[dict[str, Any]] = []
    for axis, (attr, sizes) in axes.items():
        xs = [getattr(s, attr) for s in sizes]
        found = [measured[s] for s in sizes]
        costs = [f["round_cpu_ms"] for f in found]
        slopes = [slope(xs[k], costs[k], xs[k + 1], costs[k + 1]) for k in range(2)]
        for k, (x, f) in enumerate(zip(xs, found, strict=True)):
            table.append({"axis": axis, "size": x, **f, "slope": slopes[k - 1] if k else None})
        rows.append(Row(
            f"9. scaling, round CPU vs {axis} ({'/'.join(map(str, xs))})",
            " / ".join(f"{c:.2f}" for c in costs) + " ms/round; slopes "
            + ", ".join(f"{s:.2f}" for s in slopes),
            "-", "-", f"slope <= {LINEAR:g}", all(s <= LINEAR for s in slopes),
            {"sizes": xs, "round_cpu_ms": costs, "slopes": slopes,
             "dominant": [f["dominant"] for f in found]}))
    # one point per distinct node; small steps in series (the sensors' 265 -> 301) would
    # turn noise into steep slopes, so the scrape is judged on the fit through them all
    points = sorted({(f["series"], f["scrape_p50_ms"], f["scrape_p99_ms"])
                     for f in measured.values()})
    scrape_slope = fit([(n, p50) for n, p50, _ in points])
    rows.append(Row(
        "9. scaling, scrape p50 vs series",
        f"{points[0][1]:.1f} ms at {points[0][0]:,} series .. {points[-1][1]:.1f} ms at "
        f"{points[-1][0]:,}; log-log slope {scrape_slope:.2f}",
        "-", "-", f"slope <= {LINEAR:g}", scrape_slope <= LINEAR,
        {"series_p50_p99_ms": points, "slope": scrape_slope}))
    interval_check = None
    if not quick:
        print(f"   {BASE.key} at 1 s ...", flush=True)
        at_1s = node(BASE, 20.0, 3, interval=1.0)[0]
        interval_check = {"interval_s": 1.0, "round_cpu_ms": at_1s["round_cpu_ms"],
                          "at_interval_ms": measured[BASE]["round_cpu_ms"]}
    rows[0].details["table"] = table
    rows[0].details["interval_check"] = interval_check
    return rows


def readme_block(rows: list[Row]) -> str | None:
    """The "How cost grows" table for README, from a run's rows (None without them)."""
    first = next((r for r in rows if "table" in r.details), None)
    if first is None:
        return None
    lines = ["| grows with | size | round CPU ms | slope | largest terms (wall ms of the "
             "round) | series | scrape p50 / p99 ms | scrape CPU ms |",
             "|---|---|---|---|---|---|---|---|"]
    for t in first.details["table"]:
        phases = t["phases_wall_ms"]
        top = sorted(phases, key=lambda k: -phases[k])[:2]
        dominant = ", ".join(f"{k} {phases[k]:.2f}" for k in top)
        slope_text = "-" if t["slope"] is None else f"{t['slope']:.2f}"
        lines.append(f"| {t['axis']} | {t['size']:,} | {t['round_cpu_ms']:.2f} | "
                     f"{slope_text} | {dominant} | {t['series']:,} | "
                     f"{t['scrape_p50_ms']:.1f} / {t['scrape_p99_ms']:.1f} | "
                     f"{t['scrape_cpu_ms']:.1f} |")
    check = first.details.get("interval_check")
    scrape = next((r for r in rows if "series_p50_p99_ms" in r.details), None)
    note = ("" if scrape is None else
            f"\n\nScrape p50 against series, log-log slope through every node: "
            f"{scrape.details['slope']:.2f}.")
    if check:
        note += (f"\n\nThe base node (8 GPUs, 16 jobs, 32 sensors) at the default 1 s "
                f"interval: {check['round_cpu_ms']:.2f} ms of CPU a round, against "
                f"{check['at_interval_ms']:.2f} ms at {INTERVAL:g} s.")
    return "\n".join(lines) + note

