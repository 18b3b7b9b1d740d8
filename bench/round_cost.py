"""1. Round cost: the daemon's CPU time per sampling round, against node_exporter's per
scrape. 32 hwmon sensors, a fake NVML with 8 GPUs, 16 registered jobs (signal mode)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    Row,
    build_sysfs,
    children,
    cpu_seconds,
    daemon,
    eight_gpus,
    ensure_peer,
    metric,
    workdir,
)
from tests.support.c_nvml import CNvmlState
from tests.support.daemon import free_port

TARGET_MS = 2.0
QUIET_RULES = [  # configured, never tripping: the policy runs every round as it would
    {"name": "gpu-hot", "metric": "gpu_temperature_celsius", "above": 200.0, "action": "pause"},
    {"name": "cpu-hot", "metric": "cpu_temperature_celsius", "above": 200.0,
     "action": "slow", "speed": 0.5},
    {"name": "memory", "metric": "memory_used_ratio", "above": 0.999, "action": "pause"},
]


def loaded_config(sys_root: Path, interval: float) -> dict[str, Any]:
    """The daemon the round-cost, scrape and footprint benchmarks all measure."""
    return {"daemon": {"interval": interval},
            "sources": {"sysfs_root": str(sys_root), "nvml": "auto"},
            "rules": QUIET_RULES}


def governor_cost(seconds: float) -> tuple[float, int]:
    """Seconds of daemon CPU per round, and the rounds it was measured over."""
    with workdir("round") as path:
        sys_root = build_sysfs(path)
        nvml = CNvmlState(path / "nvml.state", log_calls=False)
        nvml.write(eight_gpus())
        jobs = [["sleep", "3600"]] * 16
        with children(*jobs) as kids, daemon(path, loaded_config(sys_root, 0.05),
                                             c_nvml=nvml) as d:
            for i, kid in enumerate(kids):
                d.register(name=f"job{i}", pid=kid.pid, devices=[f"gpu{i % 8}"])
            d.wait_rounds(20)
            assert d.proc is not None
            rounds0, cpu0 = metric(d.url, "governor_rounds_total"), cpu_seconds(d.proc.pid)
            time.sleep(seconds)
            rounds1, cpu1 = metric(d.url, "governor_rounds_total"), cpu_seconds(d.proc.pid)
    rounds = int(rounds1 - rounds0)
    return (cpu1 - cpu0) / rounds, rounds


def node_exporter_cost(binary: str, scrapes: int) -> float:
    """Seconds of node_exporter CPU per scrape (its default collectors, this machine)."""
    port = free_port()
    process = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        for _ in range(100):
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        with httpx.Client(timeout=10) as client:
            for _ in range(5):
                client.get(url)
            before = cpu_seconds(process.pid)
            for _ in range(scrapes):
                client.get(url).raise_for_status()
                time.sleep(0.01)
            after = cpu_seconds(process.pid)
    finally:
        process.terminate()
        process.wait(10)
    return (after - before) / scrapes


def run(quick: bool) -> list[Row]:
    cost, rounds = governor_cost(3 if quick else 12)
    binary, note = ensure_peer("prometheus-node-exporter", "prometheus-node-exporter")
    details: dict[str, Any] = {"rounds": rounds, "governor_ms": cost * 1000, "peer": note}
    if binary is None:
        return [Row("1. round cost", f"{cost * 1000:.2f} ms/round", note, "-",
                    f"<= {TARGET_MS:g} ms", cost * 1000 <= TARGET_MS, details)]
    peer = node_exporter_cost(binary, 50 if quick else 200)
    details["node_exporter_ms"] = peer * 1000
    return [Row(
        "1. round cost (CPU)", f"{cost * 1000:.2f} ms/round",
        f"node_exporter {peer * 1000:.2f} ms/scrape", f"{cost / peer:.2f}",
        f"<= {TARGET_MS:g} ms and < node_exporter",
        cost * 1000 <= TARGET_MS and cost < peer, details)]
