"""4. Scrape: /metrics throughput and p99 latency with 4 concurrent clients for 10 s
(wrk), governor against node_exporter; and meanwhile, how late governor's rounds start.
governor runs the round-cost setup (32 sensors, 8 GPUs, 16 jobs) at interval 0.5 s."""

from __future__ import annotations

import re
import subprocess
import threading
import time

import httpx

from bench.common import (
    Row,
    build_sysfs,
    children,
    daemon,
    eight_gpus,
    ensure_peer,
    workdir,
)
from bench.round_cost import loaded_config
from tests.support.c_nvml import CNvmlState
from tests.support.daemon import free_port

INTERVAL = 0.5
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def wrk(binary: str, url: str, seconds: int) -> tuple[float, float]:
    """(requests per second, p99 latency in seconds) from wrk's own report."""
    out = subprocess.run([binary, "-t4", "-c4", f"-d{seconds}s", "--latency", url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out,  # type: ignore[union-attr]
                            re.MULTILINE).groups()
    return rps, float(value) * UNITS[unit]


def lateness_during(url: str, stop: threading.Event, seen: list[float]) -> None:
    """Reads governor_round_lateness_seconds once per round while the load runs."""
    with httpx.Client(timeout=10) as client:
        while not stop.wait(INTERVAL / 2):
            for line in client.get(url + "/metrics").text.splitlines():
                if line.startswith("governor_round_lateness_seconds "):
                    seen.append(float(line.split()[1]))


def run(quick: bool) -> list[Row]:
    seconds = 3 if quick else 10
    binary, note = ensure_peer("wrk", "wrk")
    if binary is None:
        return [Row("4. scrape", note, "-", "-", "throughput >= node_exporter, p99 < 10 ms")]
    with workdir("scrape") as path:
        sys_root = build_sysfs(path)
        nvml = CNvmlState(path / "nvml.state", log_calls=False)
        nvml.write(eight_gpus())
        with children(*[["sleep", "3600"]] * 16) as kids, daemon(
                path, loaded_config(sys_root, INTERVAL), c_nvml=nvml) as d:
            for i, kid in enumerate(kids):
                d.register(name=f"job{i}", pid=kid.pid, devices=[f"gpu{i % 8}"])
            d.wait_rounds(2)
            stop, lateness = threading.Event(), []
            watcher = threading.Thread(target=lateness_during, args=(d.url, stop, lateness))
            watcher.start()
            try:
                rps, p99 = wrk(binary, d.url + "/metrics", seconds)
            finally:
                stop.set()
                watcher.join()
            size = len(httpx.get(d.url + "/metrics").content)
    ne_binary, ne_note = ensure_peer("prometheus-node-exporter", "prometheus-node-exporter")
    peer_rps = peer_p99 = None
    if ne_binary:
        port = free_port()
        process = subprocess.Popen([ne_binary, f"--web.listen-address=127.0.0.1:{port}"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            peer_rps, peer_p99 = wrk(binary, f"http://127.0.0.1:{port}/metrics", seconds)
        finally:
            process.terminate()
            process.wait(10)
    late = max(lateness, default=0.0)
    passed = (p99 < 0.010 and late <= 0.1 * INTERVAL
              and (peer_rps is None or rps >= peer_rps))
    peer_text = (ne_note if peer_rps is None or peer_p99 is None else
                 f"node_exporter {peer_rps:.0f} req/s, p99 {peer_p99 * 1000:.1f} ms")
    return [Row(
        "4. scrape /metrics, 4 clients",
        f"{rps:.0f} req/s, p99 {p99 * 1000:.1f} ms, rounds late <= {late * 1000:.0f} ms",
        peer_text, "-" if peer_rps is None else f"{rps / peer_rps:.2f}x throughput",
        "throughput >= node_exporter, p99 < 10 ms, late <= 10% of interval", passed,
        {"rps": rps, "p99_ms": p99 * 1000, "max_lateness_ms": late * 1000,
         "exposition_bytes": size, "peer_rps": peer_rps,
         "peer_p99_ms": None if peer_p99 is None else peer_p99 * 1000})]
