"""Sensor faults under a running daemon: the daemon stays healthy, says what is wrong, and
rules act as their `on_missing` says.

The daemon runs against a copy of the fixture sysfs tree in which a test breaks one
temperature file three ways: it vanishes, it starts answering garbage, or its read blocks
(a FIFO: open() waits for a writer, as a sysfs read stuck in a driver does). A fake NVML
loses a GPU, fails one field with Unknown, and loses its driver. Throughout, a watcher
polls /healthz; the job a rule governs is a real process whose state the kernel reports.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.c_nvml import CNvmlState
from tests.support.daemon import DaemonProcess
from tests.support.fake_nvml import h100
from tests.support.processes import eventually, state
from tests.support.scenario import running, spawn, stopped

StartDaemon = Callable[..., DaemonProcess]
PACKAGE = "devices/platform/coretemp.0/hwmon/hwmon0/temp1_input"
SERIES = 'cpu_temperature_celsius{chip="platform_coretemp_0",sensor="Package id 0"}'
INTERVAL = 0.25


def write_atomic(path: Path, text: str) -> None:
    """Replace the file in one step: a reader never sees it empty (which would be a fault
    of its own, and trip an on_missing = "trip" rule)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def millicelsius(celsius: float) -> str:
    return f"{int(celsius * 1000)}\n"


class Fault:
    """One way for a temperature file to break, and its repair."""

    name = ""

    def __init__(self, path: Path):
        self.path = path

    def inject(self) -> None:
        raise NotImplementedError

    def repair(self, celsius: float) -> None:
        write_atomic(self.path, millicelsius(celsius))

    def cleanup(self) -> None:
        pass


class Vanishes(Fault):
    name = "vanishes"

    def inject(self) -> None:
        self.path.unlink()


class Garbage(Fault):
    name = "garbage"

    def inject(self) -> None:
        write_atomic(self.path, "N/A\n")


class Blocks(Fault):
    """The file becomes a FIFO: the sampler's open() blocks until a writer appears."""

    name = "blocks"

    def inject(self) -> None:
        fifo = self.path.with_name(f".{self.path.name}.fifo")
        os.mkfifo(fifo)
        os.replace(fifo, self.path)

    def repair(self, celsius: float) -> None:
        # Opening read-write never blocks and makes us a writer, which lets the stuck
        # open() return; the file is replaced before the reader sees end-of-file, so the
        # next round opens a regular file again.
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.write(fd, millicelsius(celsius).encode())
            write_atomic(self.path, millicelsius(celsius))
        finally:
            os.close(fd)

    def cleanup(self) -> None:
        if self.path.is_fifo():
            self.repair(60)


FAULTS: dict[str, type[Fault]] = {f.name: f for f in (Vanishes, Garbage, Blocks)}


class HealthWatch:
    """Polls /healthz every 50 ms on a thread and keeps every answer that was not 200."""

    def __init__(self, url: str):
        self.url = url
        self.polls = 0
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.wait(0.05):
                try:
                    response = client.get(self.url + "/healthz")
                    if response.status_code != 200:
                        self.bad.append(f"{response.status_code} {response.text}")
                except httpx.HTTPError as exc:
                    self.bad.append(repr(exc))
                self.polls += 1

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def value(exposition: str, series: str) -> float | None:
    """The value of one series in an exposition, or None when it has no sample."""
    for line in exposition.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def samplers(d: DaemonProcess) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in d.get("/v1/status").json()["samplers"]}


def rule_entry(d: DaemonProcess, name: str) -> dict[str, Any]:
    entries = [r for r in d.get("/v1/rules").json() if r["name"] == name]
    assert len(entries) == 1, entries
    return dict(entries[0])


def reload_on_missing(d: DaemonProcess, before: str, after: str) -> None:
    text = d.config_path.read_text()
    assert f'on_missing = "{before}"' in text
    d.config_path.write_text(text.replace(f'on_missing = "{before}"', f'on_missing = "{after}"'))
    response = d.call("POST", "/v1/reload")
    assert response.status_code == 200, response.text


def assert_others_report(d: DaemonProcess) -> None:
    """The rounds go on, and the CPU sampler is up with its readings."""
    status = d.get("/v1/status").json()
    cpu = next(s for s in status["samplers"] if s["name"] == "cpu")
    assert cpu["state"] == "ok", cpu
    metrics = {r["metric"] for r in status["readings"]}
    assert {"memory_used_ratio", "pressure_stall_ratio", "load_average_tasks"} <= metrics
    eventually(lambda: d.get("/v1/status").json()["sequence"] > status["sequence"],
               what="another round completes")


def assert_fault_visible(d: DaemonProcess, fault: Fault) -> None:
    """The fault in /v1/status and in the metrics, for the kind of fault it is."""
    hwmon = samplers(d)["hwmon"]
    text = d.metrics()
    if isinstance(fault, Blocks):
        # the whole sampler hangs in the read: timed out, marked down, not called again
        assert hwmon["state"] == "error" and hwmon["up"] is False, hwmon
        assert ("timed out after" in hwmon["error"]) or ("still stuck" in hwmon["error"])
        assert value(text, 'governor_sampler_up{sampler="hwmon"}') == 0.0
        errors = value(text, 'governor_sampler_errors_total{sampler="hwmon"}')
        assert errors is not None and errors >= 1
        return
    # one bad file is a problem of the round, not a failed sampler: its other sensors
    # keep reporting
    assert hwmon["state"] == "ok", hwmon
    expected = ("stopped reporting" if isinstance(fault, Vanishes)
                else "temp1_input: not a number: 'N/A'")
    assert any(expected in p for p in hwmon["problems"]), hwmon["problems"]
    assert value(text, 'governor_sampler_up{sampler="hwmon"}') == 1.0
    problems = value(text, 'governor_sampler_problems_total{sampler="hwmon"}')
    assert problems is not None and problems >= 1
    assert value(text, 'governor_cpu_temperature_celsius{chip="platform_coretemp_0",'
                       'sensor="Core 0"}') is not None
    assert value(text, "governor_" + SERIES) is None


@pytest.mark.parametrize("kind", list(FAULTS))
def test_a_broken_temperature_file(kind: str, daemon: StartDaemon, sys_tree: Path,
                                   proc_tree: Path,
                                   children: list[subprocess.Popen[bytes]]) -> None:
    fault = FAULTS[kind](sys_tree / PACKAGE)
    write_atomic(fault.path, millicelsius(60))
    rule = {"name": "cpu-hot", "metric": "cpu_temperature_celsius",
            "match": {"chip": "platform_coretemp_0", "sensor": "Package id 0"},
            "above": 80.0, "for": 0, "clear_below": 70.0, "clear_for": 0,
            "action": "pause", "on_missing": "trip"}
    d = daemon({"daemon": {"interval": INTERVAL},
                "sources": {"sysfs_root": str(sys_tree), "procfs_root": str(proc_tree),
                            "nvml": "off"},
                "rules": [rule]})
    pid = spawn(children)
    job = d.register(name="victim", pid=pid)
    d.wait_rounds(2)
    assert state(pid) in "RS"
    try:
        with HealthWatch(d.url) as health:
            # on_missing = "trip": a sensor that stops reporting pauses the job
            fault.inject()
            eventually(stopped(pid), what=f"trip: the job stops when the sensor {kind}")
            assert_fault_visible(d, fault)
            assert_others_report(d)
            entry = rule_entry(d, "cpu-hot")
            assert (entry["state"], entry["missing"], entry["value"]) == ("tripped", True, None)
            assert d.job(job["id"])["reasons"] == [
                f"cpu-hot: {SERIES} stopped reporting (on_missing = trip)"]
            fault.repair(60)
            eventually(running(pid), what="the job runs again once the sensor reads cool")

            # on_missing = "hold": a tripped series stays tripped while it is missing
            reload_on_missing(d, "trip", "hold")
            write_atomic(fault.path, millicelsius(95))
            eventually(stopped(pid), what="the hot sensor pauses the job")
            fault.inject()
            eventually(lambda: rule_entry(d, "cpu-hot")["missing"], what="series missing")
            d.wait_rounds(3)
            assert state(pid) == "T", "hold: the job stays paused while the sensor is out"
            assert rule_entry(d, "cpu-hot")["state"] == "tripped"
            fault.repair(60)
            eventually(running(pid))

            # on_missing = "clear": a missing series releases what it held
            reload_on_missing(d, "hold", "clear")
            write_atomic(fault.path, millicelsius(95))
            eventually(stopped(pid))
            fault.inject()
            eventually(running(pid), what="clear: the job runs when the sensor is out")
            assert_fault_visible(d, fault)
            fault.repair(60)
            d.wait_rounds(2)
            assert state(pid) in "RS"
    finally:
        fault.cleanup()
    assert health.polls >= 20 and health.bad == [], health.bad
    assert samplers(d)["hwmon"]["state"] == "ok", "the sampler recovers with its file"
    text = d.metrics()
    assert value(text, "governor_" + SERIES) == 60.0
    assert value(text, 'governor_actions_total{action="pause",rule="cpu-hot"}') == 3.0


def test_nvml_faults_mid_run(daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
                             c_nvml: CNvmlState,
                             children: list[subprocess.Popen[bytes]]) -> None:
    gpus: dict[str, Any] = {"gpus": [h100(i, temperature=60) for i in range(3)]}
    c_nvml.write(gpus)

    def rule(gpu: int, on_missing: str) -> dict[str, Any]:
        return {"name": f"gpu{gpu}-hot", "metric": "gpu_temperature_celsius",
                "match": {"gpu": str(gpu)}, "above": 85.0, "for": 0, "clear_below": 80.0,
                "clear_for": 0, "action": "pause", "on_missing": on_missing}

    d = daemon({"daemon": {"interval": INTERVAL},
                "sources": {"sysfs_root": str(sys_tree), "procfs_root": str(proc_tree)},
                "rules": [rule(0, "hold"), rule(1, "trip"), rule(2, "clear")]},
               c_nvml=c_nvml)
    pids = [spawn(children) for _ in range(3)]
    for gpu, pid in enumerate(pids):
        d.register(name=f"on-gpu{gpu}", pid=pid, devices=[f"gpu{gpu}"])
    d.wait_rounds(2)
    assert all(state(pid) in "RS" for pid in pids)

    def temperature(gpu: int, text: str | None = None) -> float | None:
        return value(text or d.metrics(), f'governor_gpu_temperature_celsius{{gpu="{gpu}"}}')

    with HealthWatch(d.url) as health:
        # GPU_IS_LOST on gpu1: its series go, the other GPUs keep reporting, its trip
        # rule pauses the job bound to it
        gpus["gpus"][1]["lost"] = True
        c_nvml.write(gpus)
        eventually(stopped(pids[1]), what="the job on the lost GPU is paused")
        nvml = samplers(d)["nvml"]
        assert nvml["state"] == "ok" and nvml["problems"] == ["gpu 1: GPU is lost; skipped"]
        text = d.metrics()
        assert temperature(1, text) is None
        assert temperature(0, text) == 60.0 and temperature(2, text) == 60.0
        assert value(text, 'governor_sampler_up{sampler="nvml"}') == 1.0
        assert (value(text, 'governor_sampler_problems_total{sampler="nvml"}') or 0) >= 1
        assert state(pids[0]) in "RS" and state(pids[2]) in "RS"
        gpus["gpus"][1]["lost"] = False
        c_nvml.write(gpus)
        eventually(running(pids[1]), what="the GPU is back and cool: its job runs")

        # UNKNOWN from one field of gpu0 while its rule holds it: the field is absent, the
        # rest of the GPU reports, and on_missing = "hold" keeps the job paused
        gpus["gpus"][0]["temperature"] = 90
        c_nvml.write(gpus)
        eventually(stopped(pids[0]))
        gpus["gpus"][0]["errors"] = {"nvmlDeviceGetTemperatureV": "UNKNOWN"}
        c_nvml.write(gpus)
        eventually(lambda: temperature(0) is None, what="gpu0's temperature is absent")
        problems = samplers(d)["nvml"]["problems"]
        assert problems == ["gpu 0: nvmlDeviceGetTemperatureV: Unknown Error"], problems
        text = d.metrics()
        assert value(text, 'governor_gpu_utilization_ratio{gpu="0"}') == 0.37
        assert value(text, 'governor_sampler_up{sampler="nvml"}') == 1.0
        d.wait_rounds(3)
        assert state(pids[0]) == "T", "hold: the job stays paused"
        del gpus["gpus"][0]["errors"]
        gpus["gpus"][2]["temperature"] = 90
        c_nvml.write(gpus)
        eventually(stopped(pids[2]))
        eventually(lambda: temperature(0) == 90.0)

        # DRIVER_NOT_LOADED: every GPU series goes and NVML is down; gpu1's rule trips,
        # gpu0's holds, gpu2's clears; the other samplers and the API carry on
        broken = {**gpus, "count_error": "DRIVER_NOT_LOADED", "init_error": "DRIVER_NOT_LOADED"}
        c_nvml.write(broken)
        eventually(lambda: samplers(d)["nvml"]["state"] == "error", what="NVML is down")
        eventually(stopped(pids[1]), what="trip: the job on gpu1 is paused")
        eventually(running(pids[2]), what="clear: the job on gpu2 is released")
        assert state(pids[0]) == "T", "hold: the job on gpu0 stays paused"
        nvml = samplers(d)["nvml"]
        assert "Driver Not Loaded" in nvml["error"], nvml
        text = d.metrics()
        assert not [line for line in text.splitlines() if line.startswith("governor_gpu_")]
        assert value(text, 'governor_sampler_up{sampler="nvml"}') == 0.0
        assert (value(text, 'governor_sampler_errors_total{sampler="nvml"}') or 0) >= 1
        assert_others_report(d)
        d.wait_rounds(2)
        assert state(pids[0]) == "T" and state(pids[1]) == "T" and state(pids[2]) in "RS"

        # the driver comes back, every GPU cool: NVML is brought back, every job runs
        for gpu in gpus["gpus"]:
            gpu["temperature"] = 60
        c_nvml.write(gpus)
        eventually(lambda: samplers(d)["nvml"]["state"] == "ok", timeout=30,
                   what="NVML is back (after the runner's and NVML's backoff)")
        for pid in pids:
            eventually(running(pid))
        text = d.metrics()
        assert [temperature(gpu, text) for gpu in range(3)] == [60.0, 60.0, 60.0]
        assert value(text, 'governor_sampler_up{sampler="nvml"}') == 1.0
    assert health.polls >= 20 and health.bad == [], health.bad
    d.stop()
    assert "NVML is available again" in d.log()
