"""The daemon as a user runs it: a subprocess on a free port, against fixture trees.

As node_exporter's end-to-end test: the daemon runs against fixture sysfs and procfs
trees and a fake NVML, and its exposition must equal tests/golden/metrics.prom (with the
timing series left out). Run with UPDATE_GOLDEN=1 to rewrite the golden file after an
intended change, and review the diff.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.c_nvml import CNvmlState
from tests.support.daemon import REPO, DaemonProcess, free_port, to_toml
from tests.support.fake_nvml import h100
from tests.support.stat_ticker import StatTicker

GOLDEN = Path(__file__).parent / "golden" / "metrics.prom"
#: series whose values are timings or depend on how many rounds ran
VOLATILE = ("governor_sample_duration_seconds", "governor_round_duration_seconds",
            "governor_rounds_total", "governor_rounds_overrun_total", "governor_build_info",
            "governor_sampler_errors_total", "governor_sampler_problems_total",
            "governor_round_lateness_seconds", "governor_rounds_late_total")


StartDaemon = Callable[..., DaemonProcess]


def fixture_config(sys_tree: Path, proc_tree: Path, nvml: str = "auto") -> dict[str, Any]:
    return {
        "daemon": {"interval": 0.1},
        "sources": {"sysfs_root": str(sys_tree), "procfs_root": str(proc_tree), "nvml": nvml},
    }


def two_gpu_state() -> dict[str, Any]:
    return {"gpus": [
        h100(0, pids=[4242]),
        h100(1, temperature=79, utilization=100, clock_events=0x40 | 0x20,
             errors={"nvmlDeviceGetPowerUsage": "NOT_SUPPORTED"}),
    ]}


def stable(exposition: str) -> str:
    """The exposition without the sample lines of volatile series."""
    lines = []
    for line in exposition.splitlines():
        if not line.startswith("#") and line.split("{")[0].split(" ")[0] in VOLATILE:
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def series(exposition: str, prefix: str) -> list[str]:
    return [line for line in exposition.splitlines() if line.startswith(prefix)]


def test_golden_exposition(daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
                           c_nvml: CNvmlState) -> None:
    c_nvml.write(two_gpu_state())
    config = fixture_config(sys_tree, proc_tree)
    config["daemon"]["interval"] = 0.5  # room for every sampler on a busy machine
    with StatTicker(proc_tree):
        d = daemon(config, c_nvml=c_nvml)
        d.wait_rounds(3)  # the NPU's utilization needs two rounds
        got = stable(d.metrics())
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(got)
    assert got == GOLDEN.read_text()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_on_the_daemons_exposition(daemon: StartDaemon, sys_tree: Path,
                                            proc_tree: Path, c_nvml: CNvmlState) -> None:
    c_nvml.write(two_gpu_state())
    d = daemon(fixture_config(sys_tree, proc_tree), c_nvml=c_nvml)
    d.wait_rounds(2)
    result = subprocess.run(["promtool", "check", "metrics"], input=d.metrics(),
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_health_metrics_and_status_on_this_machine(daemon: StartDaemon) -> None:
    """The real /sys and /proc of this machine, and the real pynvml."""
    d = daemon({"daemon": {"interval": 0.2}})
    assert d.get("/healthz").json() == {"status": "ok"}
    d.wait_rounds(2)
    text = d.metrics()
    assert series(text, "governor_cpu_utilization_ratio{")
    assert series(text, "governor_memory_used_ratio ")
    assert 'governor_sampler_up{sampler="cpu"} 1.0' in text
    assert series(text, "governor_build_info{")
    status = d.get("/v1/status").json()
    assert set(status) >= {"samplers", "readings", "rules", "jobs"}
    cpu = next(s for s in status["samplers"] if s["name"] == "cpu")
    assert cpu["state"] == "ok" and cpu["up"] is True and cpu["error"] is None
    assert any(r["metric"] == "memory_used_ratio" for r in status["readings"])


def test_every_core_has_its_series_in_the_first_scrape_after_start(
        daemon: StartDaemon) -> None:
    """Scraped as soon as /healthz first answers, at the default interval, on this
    machine's /proc: the first round's window can be shorter than a clock tick, and a core
    whose time did not move must still have its series (a blink reads as "missing")."""
    cores = {line.split()[0].removeprefix("cpu")
             for line in Path("/proc/stat").read_text().splitlines()
             if re.match(r"cpu\d+ ", line)}
    for start in range(8):
        d = daemon({})
        seen = set(re.findall(r'^governor_cpu_utilization_ratio\{cpu="(\d+)"\}',
                              d.metrics(), re.MULTILINE))
        assert seen == cores, f"start {start}: series for cores {sorted(seen)} of {sorted(cores)}"
        d.stop()


def test_status_reports_sampler_health_and_why(daemon: StartDaemon, empty_sys: Path,
                                               proc_tree: Path) -> None:
    d = daemon({"daemon": {"interval": 0.1},
                "sources": {"sysfs_root": str(empty_sys), "procfs_root": str(proc_tree)}})
    samplers = {s["name"]: s for s in d.get("/v1/status").json()["samplers"]}
    assert samplers["hwmon"]["state"] == "unavailable"
    assert "no hwmon chips or thermal zones" in samplers["hwmon"]["error"]
    assert samplers["amdgpu"]["state"] == "unavailable"
    d.stop()
    log = d.log()
    assert "hwmon: not available: no hwmon chips or thermal zones" in log


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_without_nvml_the_daemon_runs_cpu_only(daemon: StartDaemon) -> None:
    """The real pynvml here finds no libnvidia-ml: CPU-only, healthy, no GPU series."""
    d = daemon({"daemon": {"interval": 0.1}})
    d.wait_rounds(2)
    assert d.get("/healthz").status_code == 200
    text = d.metrics()
    assert not series(text, "governor_gpu_")
    assert 'sampler="nvml"' not in text
    nvml = next(s for s in d.get("/v1/status").json()["samplers"] if s["name"] == "nvml")
    assert nvml["state"] == "unavailable"
    assert "NVML Shared Library Not Found" in nvml["error"]
    d.stop()
    assert "nvml: not available: NVML Shared Library Not Found" in d.log()


def test_library_not_found_with_the_fake(daemon: StartDaemon, c_nvml: CNvmlState,
                                         sys_tree: Path, proc_tree: Path) -> None:
    c_nvml.write({"init_error": "LIBRARY_NOT_FOUND"})
    d = daemon(fixture_config(sys_tree, proc_tree), c_nvml=c_nvml)
    d.wait_rounds(2)
    assert d.get("/healthz").status_code == 200
    text = d.metrics()
    assert not series(text, "governor_gpu_")
    assert series(text, "governor_cpu_temperature_celsius{")


def test_a_gpu_lost_mid_run(daemon: StartDaemon, c_nvml: CNvmlState, sys_tree: Path,
                            proc_tree: Path) -> None:
    state = two_gpu_state()
    c_nvml.write(state)
    d = daemon(fixture_config(sys_tree, proc_tree), c_nvml=c_nvml)
    d.wait_rounds(1)
    assert series(d.metrics(), 'governor_gpu_temperature_celsius{gpu="1"}')
    state["gpus"][1]["lost"] = True
    c_nvml.write(state)
    d.wait_rounds(3)
    text = d.metrics()
    assert not [s for s in text.splitlines() if 'gpu="1"' in s]
    assert 'governor_gpu_temperature_celsius{gpu="0"} 61.0' in text
    assert 'governor_sampler_up{sampler="nvml"} 1.0' in text
    assert d.get("/healthz").status_code == 200
    nvml = next(s for s in d.get("/v1/status").json()["samplers"] if s["name"] == "nvml")
    assert nvml["problems"] == ["gpu 1: GPU is lost; skipped"]


def test_driver_unloaded_and_back(daemon: StartDaemon, c_nvml: CNvmlState,
                                  sys_tree: Path, proc_tree: Path) -> None:
    state = two_gpu_state()
    c_nvml.write(state)
    d = daemon(fixture_config(sys_tree, proc_tree), c_nvml=c_nvml)
    d.wait_rounds(1)
    c_nvml.write({**state, "count_error": "DRIVER_NOT_LOADED",
                      "init_error": "DRIVER_NOT_LOADED"})
    d.wait_rounds(2)
    text = d.metrics()
    assert not series(text, "governor_gpu_")
    assert 'governor_sampler_up{sampler="nvml"} 0.0' in text, "a lost driver is a failure"
    assert d.get("/healthz").status_code == 200, "a lost driver does not make the daemon sick"
    c_nvml.write(state)
    d.wait_rounds(25)  # NVML is retried with a backoff that starts at 1 s
    assert series(d.metrics(), 'governor_gpu_temperature_celsius{gpu="1"}')
    assert 'governor_sampler_up{sampler="nvml"} 1.0' in d.metrics()
    assert "NVML is available again" in d.log()


def run_cli(*args: str, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "governor", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=full_env)


def test_bad_config_exits_1_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(to_toml({"daemon": {"interval": "soon"}, "api": {"listne": "x"}}))
    result = run_cli("run", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert f"governor: {config}: daemon.interval: 'soon' is not a duration" in result.stderr
    assert f"governor: {config}: api.listne: unknown key" in result.stderr


def test_nvml_required_without_nvml_refuses_to_start(tmp_path: Path,
                                                     c_nvml: CNvmlState) -> None:
    c_nvml.write({"init_error": "LIBRARY_NOT_FOUND"})
    config = tmp_path / "governor.toml"
    config.write_text(to_toml({"sources": {"nvml": "required"},
                               "api": {"listen": f"127.0.0.1:{free_port()}"}}))
    result = run_cli("run", "--config", str(config), cwd=tmp_path, env=c_nvml.env())
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert errors == ['governor: sources.nvml = "required" but NVML cannot be used: '
                      "NVML Shared Library Not Found (libnvidia-ml.so is not installed: "
                      "no NVIDIA driver)"]


def test_a_taken_port_is_one_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "governor.toml"
        config.write_text(to_toml({"api": {"listen": f"127.0.0.1:{port}"}}))
        result = run_cli("run", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert f"governor: cannot listen on 127.0.0.1:{port}: Address already in use" in (
        result.stderr)


def test_sigterm_stops_cleanly(daemon: StartDaemon) -> None:
    d = daemon({"daemon": {"interval": 0.1}})
    assert d.stop(signal.SIGTERM) == 0
    assert "governor stopped" in d.log()


def test_errors_are_json_with_one_sentence(daemon: StartDaemon) -> None:
    d = daemon({"daemon": {"interval": 0.1}})
    missing = d.get("/v2/nothing")
    assert missing.status_code == 404 and missing.json() == {"error": "There is no such path."}
    import httpx

    wrong = httpx.post(d.url + "/healthz")
    assert wrong.status_code == 405 and set(wrong.json()) == {"error"}


def test_api_connections_send_without_waiting_for_acks() -> None:
    """TCP_NODELAY on every accepted connection: without it, a keep-alive scrape (as
    Prometheus makes) waited 40 ms for the client's delayed ACK between the response's
    headers and body (asyncio sets it only on sockets created with proto IPPROTO_TCP)."""
    import socket

    from governor.service.daemon import bind

    listener = bind("127.0.0.1", 0)
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert accepted.proto == socket.IPPROTO_TCP
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for s in (accepted, client, listener):
            s.close()
