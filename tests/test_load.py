"""Load: 50 clients hammer /metrics and /v1/status while a rule trips and clears.

The daemon samples every 0.5 s. While the clients run, the test heats a fixture sensor
past a pause rule (for = 0) and cools it again, three times, and watches the registered
job's state in /proc. Time on a shared machine is not a measure, so the checks count:
no request failed, no round started more than half an interval late
(governor_rounds_late_total), and the job was stopped and resumed within the round that
read the new value: governor_rounds_total, read just after the write and again when the
job is seen to change, differs by at most 2 (a round may already have been under way).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.c_nvml import CNvmlState
from tests.support.daemon import DaemonProcess
from tests.support.fake_nvml import h100
from tests.support.processes import busy_child, state, stop

StartDaemon = Callable[..., DaemonProcess]
PACKAGE = "devices/platform/coretemp.0/hwmon/hwmon0/temp1_input"
CLIENTS = 50
SECONDS = 20.0
INTERVAL = 0.5
CYCLES = 3


class Load:
    """CLIENTS clients, each with a connection of its own, alternating between /metrics
    and /v1/status as fast as they are answered, on an event loop of their own."""

    def __init__(self, url: str, clients: int, seconds: float):
        self.url = url
        self.clients = clients
        self.seconds = seconds
        self.served: dict[str, int] = {"/metrics": 0, "/v1/status": 0}
        self.failures: list[str] = []
        self.elapsed = 0.0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _client(self, first: int, until: float) -> None:
        paths = ("/metrics", "/v1/status")
        n = first
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            while time.monotonic() < until:
                path = paths[n % 2]
                n += 1
                try:
                    response = await client.get(path)
                    if response.status_code != 200:
                        self.failures.append(f"{path}: {response.status_code}")
                        continue
                    if path == "/metrics":
                        assert b"governor_rounds_total" in response.content
                except (httpx.HTTPError, AssertionError) as exc:
                    self.failures.append(f"{path}: {exc!r}")
                    continue
                self.served[path] += 1

    async def _run(self) -> None:
        began = time.monotonic()
        until = began + self.seconds
        await asyncio.gather(*(self._client(i, until) for i in range(self.clients)))
        self.elapsed = time.monotonic() - began

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def requests(self) -> int:
        return sum(self.served.values())

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._thread.join(self.seconds + 60)
        assert not self._thread.is_alive(), "the clients did not finish"


def counter(d: DaemonProcess, name: str) -> float:
    for line in d.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in the exposition")


def heat(sys_tree: Path, celsius: float) -> None:
    path = sys_tree / PACKAGE
    tmp = path.with_name(".load.tmp")
    tmp.write_text(f"{int(celsius * 1000)}\n")
    os.replace(tmp, path)


def rounds_until(d: DaemonProcess, check: Callable[[], bool], timeout: float = 15.0) -> float:
    """Polls /proc every 5 ms until check() holds; governor_rounds_total then."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not true after {timeout} s"
        time.sleep(0.005)
    return counter(d, "governor_rounds_total")


@pytest.fixture
def job_process() -> Iterator[subprocess.Popen[bytes]]:
    child = busy_child()
    yield child
    stop(child)


def test_fifty_clients_while_a_rule_trips_and_clears(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path, c_nvml: CNvmlState,
        job_process: subprocess.Popen[bytes],
        record_property: Callable[[str, Any], None]) -> None:
    c_nvml.write({"gpus": [h100(0), h100(1, temperature=79)]})
    heat(sys_tree, 60)
    rule = {"name": "cpu-hot", "metric": "cpu_temperature_celsius",
            "match": {"chip": "platform_coretemp_0", "sensor": "Package id 0"},
            "above": 80.0, "for": 0, "clear_below": 70.0, "clear_for": 0, "action": "pause"}
    d = daemon({"daemon": {"interval": INTERVAL},
                "sources": {"sysfs_root": str(sys_tree), "procfs_root": str(proc_tree)},
                "rules": [rule]}, c_nvml=c_nvml)
    pid = job_process.pid
    d.register(name="under-load", pid=pid)
    d.wait_rounds(2)
    late_before = counter(d, "governor_rounds_late_total")
    rounds_before = counter(d, "governor_rounds_total")
    lag: list[tuple[str, float]] = []

    with Load(d.url, CLIENTS, SECONDS) as load:
        time.sleep(2.0)  # every client connected and busy
        for _ in range(CYCLES):
            heat(sys_tree, 95)
            written = counter(d, "governor_rounds_total")
            lag.append(("pause", rounds_until(d, lambda: state(pid) == "T") - written))
            time.sleep(1.5)
            assert state(pid) == "T", "the hot sensor keeps the job paused"
            heat(sys_tree, 60)
            written = counter(d, "governor_rounds_total")
            lag.append(("resume", rounds_until(d, lambda: state(pid) in "RS") - written))
            time.sleep(1.5)
        assert load.running, "the load lasted through every cycle"

    late = counter(d, "governor_rounds_late_total") - late_before
    rounds = counter(d, "governor_rounds_total") - rounds_before
    summary = (f"{load.requests} requests in {load.elapsed:.1f} s "
               f"({load.requests / load.elapsed:.0f}/s; {load.served['/metrics']} /metrics, "
               f"{load.served['/v1/status']} /v1/status) from {CLIENTS} clients; "
               f"{rounds:.0f} rounds, {late:.0f} late; rounds from write to action: "
               + ", ".join(f"{what} {n:.0f}" for what, n in lag))
    print(summary)
    record_property("load", summary)
    assert load.failures == [], load.failures[:10]
    assert load.requests >= CLIENTS, summary
    assert late == 0, f"rounds started more than half an interval late: {summary}"
    assert all(n <= 2 for _, n in lag), summary
    assert len(lag) == 2 * CYCLES
    text = d.metrics()
    assert f'governor_actions_total{{action="pause",rule="cpu-hot"}} {CYCLES:.1f}' in text
    assert f'governor_actions_total{{action="resume",rule="cpu-hot"}} {CYCLES:.1f}' in text
    assert d.get("/healthz").status_code == 200
