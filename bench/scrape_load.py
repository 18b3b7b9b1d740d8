"""What a scrape costs, alone and under load: numbers for the README and for reviews.

Run from the repository root with the project's virtual environment:

    .venv/bin/python bench/scrape_load.py                  # both parts
    .venv/bin/python bench/scrape_load.py --in-process     # render cost only
    .venv/bin/python bench/scrape_load.py --clients 50 --seconds 10 --path /metrics

The in-process part builds a daemon against the fixture sysfs and procfs trees and a fake
NVML with two GPUs, and times `render_metrics()` when nothing changed since the last
scrape (the common case: many scrapers, one round per interval) and right after a new
snapshot. The live part starts the real daemon and has N concurrent clients, each with a
connection of its own, alternate between /metrics and /v1/status. Timings depend on the
machine and on what else runs on it: compare runs taken side by side, never across
machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.daemon import DaemonProcess  # noqa: E402
from tests.support.fake_nvml import h100  # noqa: E402
from tests.support.ttar import unpack  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
RULES = [
    {"name": "cpu-hot", "metric": "cpu_temperature_celsius", "above": 80.0, "for": 0,
     "clear_below": 70.0, "action": "pause"},
    {"name": "gpu-hot", "metric": "gpu_temperature_celsius", "above": 85.0, "for": "5s",
     "clear_below": 80.0, "action": "slow", "speed": 0.5},
]


def trees(workdir: Path) -> tuple[Path, Path, Path]:
    """A fixture sysfs tree, procfs tree and fake NVML state file under workdir."""
    unpack(FIXTURES / "sys.ttar", workdir)
    proc = workdir / "proc"
    shutil.copytree(FIXTURES / "proc", proc, symlinks=True)
    nvml = workdir / "nvml.json"
    nvml.write_text(json.dumps({"gpus": [h100(0), h100(1, temperature=79)]}))
    return workdir / "sys", proc, nvml


def in_process(workdir: Path, repeat: int) -> dict[str, Any]:
    sys_tree, proc, nvml = trees(workdir)
    os.environ["GOVERNOR_NVML_MODULE"] = "tests.support.fake_nvml"
    os.environ["FAKE_NVML_STATE"] = str(nvml)
    from governor.config import parse_config
    from governor.service.daemon import Daemon

    config = parse_config({
        "daemon": {"interval": 1.0, "state_dir": str(workdir / "state")},
        "sources": {"sysfs_root": str(sys_tree), "procfs_root": str(proc)},
        "rules": RULES,
    })
    daemon = Daemon(config)
    try:
        daemon.loop.run_once()
        daemon.loop.run_once()
        body = daemon.render_metrics()
        began = time.perf_counter()
        for _ in range(repeat):
            daemon.render_metrics()
        unchanged = (time.perf_counter() - began) / repeat
        latest = daemon.store.latest
        assert latest is not None
        began = time.perf_counter()
        for i in range(repeat):
            # a new snapshot object each time, as after every round
            daemon.store.publish(replace(latest, sequence=latest.sequence + i + 1))
            daemon.render_metrics()
        changed = (time.perf_counter() - began) / repeat
    finally:
        daemon.loop.stop()
        daemon.runner.close()
    return {
        "exposition_bytes": len(body),
        "series": sum(1 for line in body.splitlines() if not line.startswith(b"#")),
        "render_unchanged_us": round(unchanged * 1e6, 1),
        "render_after_new_snapshot_us": round(changed * 1e6, 1),
    }


async def _client(url: str, paths: tuple[str, ...], until: float, latencies: list[float],
                  failures: list[str]) -> int:
    import httpx

    served = 0
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while time.monotonic() < until:
            path = paths[served % len(paths)]
            began = time.monotonic()
            try:
                response = await client.get(path)
                if response.status_code != 200:
                    failures.append(f"{path}: {response.status_code}")
            except httpx.HTTPError as exc:
                failures.append(f"{path}: {exc!r}")
            latencies.append(time.monotonic() - began)
            served += 1
    return served


def counter(exposition: str, name: str) -> float | None:
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def _load(url: str, paths: tuple[str, ...], clients: int,
                seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    failures: list[str] = []
    began = time.monotonic()
    until = began + seconds
    served = await asyncio.gather(*(_client(url, paths, until, latencies, failures)
                                    for _ in range(clients)))
    elapsed = time.monotonic() - began
    latencies.sort()
    return {
        "paths": list(paths),
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": sum(served),
        "requests_per_second": round(sum(served) / elapsed, 1),
        "failed": len(failures),
        "latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "latency_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
    }


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def live(workdir: Path, paths: tuple[str, ...], clients: int, seconds: float,
         interval: float) -> dict[str, Any]:
    sys_tree, proc, nvml = trees(workdir)
    config = {
        "daemon": {"interval": interval},
        "sources": {"sysfs_root": str(sys_tree), "procfs_root": str(proc)},
        "rules": RULES,
    }
    run_dir = workdir / "daemon"
    run_dir.mkdir()
    daemon = DaemonProcess(run_dir, config, fake_nvml_state=nvml).start()
    assert daemon.proc is not None
    try:
        before = daemon.metrics()
        cpu_before = _cpu_seconds(daemon.proc.pid)
        result = asyncio.run(_load(daemon.url, paths, clients, seconds))
        cpu = _cpu_seconds(daemon.proc.pid) - cpu_before
        after = daemon.metrics()
    finally:
        daemon.stop()
    # the daemon's own CPU time per request: what a scrape costs it, whoever else runs
    result["daemon_cpu_ms_per_request"] = round(cpu / max(result["requests"], 1) * 1000, 3)
    for name in ("governor_rounds_total", "governor_rounds_overrun_total",
                 "governor_rounds_late_total"):
        start, end = counter(before, name), counter(after, name)
        key = name.removeprefix("governor_")
        result[key] = None if start is None or end is None else end - start
    result["interval"] = interval
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--path", action="append", dest="paths",
                        help="what the clients ask for, in turn (default: /metrics and "
                        "/v1/status); repeat for several")
    parser.add_argument("--in-process", action="store_true", help="render cost only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="governor-bench-") as tmp:
        work = Path(tmp)
        (work / "a").mkdir()
        report: dict[str, Any] = {"render": in_process(work / "a", args.repeat)}
        if not args.in_process:
            (work / "b").mkdir()
            paths = tuple(args.paths or ("/metrics", "/v1/status"))
            report["load"] = live(work / "b", paths, args.clients, args.seconds,
                                  args.interval)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
