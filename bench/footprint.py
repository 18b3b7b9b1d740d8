"""5. Footprint and scale: resident memory after start and after 10,000 rounds (the
round-cost setup at interval 10 ms); one policy decision with 1,000 jobs and 64 series
per rule, timed in process."""

from __future__ import annotations

import statistics
import time
from types import MappingProxyType

import psutil

from bench.common import Row, build_sysfs, children, daemon, eight_gpus, metric, workdir
from bench.round_cost import loaded_config
from governor.config import parse_config
from governor.jobs.model import Job, Mode
from governor.policy.directives import decide
from governor.policy.rules import evaluate_rules
from governor.snapshot import Snapshot, reading
from tests.support.c_nvml import CNvmlState

RSS_LIMIT = 80 * 2**20


def memory(rounds: int) -> tuple[int, int, int]:
    """(resident bytes after start, after `rounds` rounds, rounds counted)."""
    with workdir("footprint") as path:
        sys_root = build_sysfs(path)
        nvml = CNvmlState(path / "nvml.state", log_calls=False)
        nvml.write(eight_gpus())
        with children(*[["sleep", "3600"]] * 16) as kids, daemon(
                path, loaded_config(sys_root, 0.01), c_nvml=nvml) as d:
            for i, kid in enumerate(kids):
                d.register(name=f"job{i}", pid=kid.pid, devices=[f"gpu{i % 8}"])
            d.wait_rounds(100)
            assert d.proc is not None
            process = psutil.Process(d.proc.pid)
            start = metric(d.url, "governor_rounds_total")
            after_start = process.memory_info().rss
            while metric(d.url, "governor_rounds_total") < start + rounds:
                time.sleep(1.0)
            counted = int(metric(d.url, "governor_rounds_total") - start)
            return after_start, process.memory_info().rss, counted


def decision_ms(jobs: int = 1000, series: int = 64, repeats: int = 30) -> float:
    """Median time of one round's policy: every rule steps every series, then every job's
    directive is decided."""
    rules = parse_config({"rules": [
        {"name": "gpu-hot", "metric": "gpu_temperature_celsius", "above": 85.0, "for": 0,
         "clear_below": 80.0, "action": "slow", "speed": 0.5},
        {"name": "gpu-critical", "metric": "gpu_temperature_celsius", "above": 90.0,
         "for": "5s", "clear_below": 85.0, "action": "pause"},
        {"name": "gpu-busy", "metric": "gpu_utilization_ratio", "above": 0.99, "for": 0,
         "action": "slow", "speed": 0.8, "max_priority": 5},
    ]}).rules
    readings = []
    for gpu in range(series):
        readings.append(reading("gpu_temperature_celsius", 80 + gpu % 15, gpu=str(gpu)))
        readings.append(reading("gpu_utilization_ratio", (gpu % 10) / 10, gpu=str(gpu)))
    snapshot = Snapshot(1, 0.0, 0.0, tuple(readings), (), MappingProxyType({}))
    population = [Job(id=f"{i:08x}", name=f"job{i}", mode=Mode.COOPERATIVE, pid=None,
                      pid_started_at=None, cgroup=None, devices=(f"gpu{i % series}",),
                      priority=i % 10, registered_at=0.0) for i in range(jobs)]
    states: dict = {}  # type: ignore[type-arg]
    timings = []
    for k in range(repeats):
        began = time.perf_counter()
        states, _ = evaluate_rules(rules, states, snapshot, float(k))
        decide(rules, states, population)
        timings.append(time.perf_counter() - began)
    return statistics.median(timings) * 1000


def run(quick: bool) -> list[Row]:
    rounds = 1_000 if quick else 10_000
    start, end, counted = memory(rounds)
    growth = (end - start) / start
    policy = decision_ms()
    return [
        Row("5. memory", f"{start / 2**20:.1f} MB -> {end / 2**20:.1f} MB after "
                         f"{counted} rounds ({growth:+.1%})", "-", "-",
            "< 80 MB, growth <= 5%", end < RSS_LIMIT and growth <= 0.05,
            {"rss_start": start, "rss_end": end, "rounds": counted}),
        Row("5. policy decision, 1,000 jobs", f"{policy:.2f} ms", "-", "-", "< 10 ms",
            policy < 10.0, {"median_ms": policy}),
    ]
