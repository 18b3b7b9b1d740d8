"""The simulated GPU as a plant worth controlling: its power limit (set through PowerCapper
as a real GPU's), sensor lag and noise, the firmware's own slowdown, a step in ambient
temperature, and the steady speed for a target. A fake clock and a fixture procfs, as in
test_simulated_sampler.py; every key is optional, and a scenario without them behaves as
before (that file's tests)."""

from __future__ import annotations

import math
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from governor.actuators.gpu_power import PowerCapper, undo_checked
from governor.policy.directives import PowerCap
from governor.safety.journal import Journal
from governor.sampling.paths import SysPaths
from governor.sampling.simulated import (
    CLOCK_TICKS,
    ScenarioError,
    SimulatedNvmlError,
    SimulatedSampler,
    load_scenario,
    steady_speed,
)
from tests.support.daemon import DaemonProcess
from tests.support.processes import eventually
from tests.support.scenario import spawn
from tests.support.simulated import Clock, write_stat

BASE = "[[gpu]]\nambient = 30\nheat = 10\ncool = 0.1\n"


class Plant:
    """One simulated GPU (gpu0) with a job that uses a whole CPU while `busy`."""

    def __init__(self, tmp_path: Path, keys: str = "", *, busy: bool = True):
        path = tmp_path / "scenario.toml"
        path.write_text(BASE + keys)
        self.proc = tmp_path / "proc"
        self.ticks = 0
        self.busy = busy
        write_stat(self.proc, 4242, 0)
        self.clock = Clock()
        self.sampler = SimulatedSampler(load_scenario(path), SysPaths(tmp_path, self.proc),
                                        lambda: [(4242, ["gpu0"])], clock=self.clock)
        self.values = self.round(0.0)

    def round(self, seconds: float) -> dict[tuple[str, str], float]:
        """Advance `seconds` (the job busy or not), sample, and return
        {(metric, reason or ""): value} for gpu0."""
        self.clock.now += seconds
        if self.busy:
            self.ticks += round(seconds * CLOCK_TICKS)
            write_stat(self.proc, 4242, self.ticks)
        self.values = {(r.metric, dict(r.labels).get("reason", "")): r.value
                       for r in self.sampler.sample().readings if r.metric != "gpu_info"}
        return self.values

    @property
    def temperature(self) -> float:
        return self.values[("gpu_temperature_celsius", "")]

    @property
    def utilization(self) -> float:
        return self.values[("gpu_utilization_ratio", "")]


def heated(start: float, used: float, seconds: float, ambient: float = 30.0) -> float:
    settled = ambient + 10 * used / 0.1
    return settled + (start - settled) * math.exp(-0.1 * seconds)


# --- power and its limit ---


def test_a_power_limit_caps_utilization_and_power(tmp_path: Path) -> None:
    plant = Plant(tmp_path, "power_idle = 100\npower_max = 300\npower_limit = 200\n")
    plant.round(1.0)
    assert plant.utilization == pytest.approx(0.5), "(200 - 100) / (300 - 100)"
    assert plant.values[("gpu_power_watts", "")] == pytest.approx(200.0)
    assert plant.values[("gpu_power_limit_watts", "")] == 200.0
    assert plant.temperature == pytest.approx(heated(30, 0.5, 1.0), abs=0.01)

    plant.sampler.set_power_limit(0, 150)
    plant.round(1.0)
    assert plant.utilization == pytest.approx(0.25)
    assert plant.values[("gpu_power_watts", "")] == pytest.approx(150.0)
    assert plant.values[("gpu_power_limit_watts", "")] == 150.0
    plant.sampler.set_power_limit(0, 300)
    assert plant.round(1.0)[("gpu_utilization_ratio", "")] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"outside 100\.\.300 W"):
        plant.sampler.set_power_limit(0, 90)


def test_the_limit_starts_at_power_max_and_a_lower_job_is_not_capped(tmp_path: Path) -> None:
    plant = Plant(tmp_path, "power_max = 700\n")
    plant.round(1.0)
    assert plant.values[("gpu_power_limit_watts", "")] == 700.0, "power_limit: power_max"
    assert plant.utilization == pytest.approx(1.0)
    plant.sampler.set_power_limit(0, 375)  # caps at (375 - 50) / 650 = 0.5
    plant.busy = False  # idle: nothing to cap
    assert plant.round(1.0)[("gpu_utilization_ratio", "")] == 0.0


def test_the_nvml_stand_in_reads_and_sets_limits_in_milliwatts(tmp_path: Path) -> None:
    plant = Plant(tmp_path, "power_max = 700\npower_limit = 600\npower_limit_min = 200\n")
    nvml = plant.sampler.nvml
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetCount() == 1
    uuid = nvml.nvmlDeviceGetUUID(handle)
    assert uuid.startswith("SIM-") and nvml.nvmlDeviceGetHandleByUUID(uuid.encode()) == handle
    assert nvml.nvmlDeviceGetPowerManagementLimit(handle) == 600_000
    assert nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle) == 600_000
    assert nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle) == (200_000, 700_000)
    nvml.nvmlDeviceSetPowerManagementLimit(handle, 250_000)
    assert nvml.nvmlDeviceGetEnforcedPowerLimit(handle) == 250_000
    assert plant.sampler.power_limits.get(0) == 250.0
    assert nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle) == 600_000
    with pytest.raises(nvml.NVMLError):
        nvml.nvmlDeviceSetPowerManagementLimit(handle, 100_000)
    with pytest.raises(SimulatedNvmlError):
        nvml.nvmlDeviceGetHandleByIndex(1)
    with pytest.raises(nvml.NVMLError):
        nvml.nvmlDeviceGetHandleByUUID("GPU-nope")
    nvml.nvmlShutdown()


def test_power_capper_caps_and_restores_a_simulated_gpu(tmp_path: Path) -> None:
    """PowerCapper, as the daemon builds it when sources.simulate is set: the simulated
    sampler's NVML stand-in, no root needed."""
    plant = Plant(tmp_path, "power_idle = 100\npower_max = 300\npower_limit_min = 150\n")
    journal = Journal(tmp_path / "state")
    capper = PowerCapper(journal, nvml=plant.sampler.nvml, is_root=lambda: False)
    assert capper.unavailable == "setting a GPU power limit needs root"
    capper = PowerCapper(journal, nvml=plant.sampler.nvml, is_root=lambda: True)
    assert capper.unavailable is None
    cap = PowerCap(gpu="0", watts=200.0, rules=("hot",), reasons=("hot: 85 > 80",))
    assert capper.apply({"hot": cap}) == [("power_cap", "0", cap)]
    assert capper.capped == {"0": 200.0}
    entry = journal.holds()["power_cap:0"]
    assert entry["original_mw"] == 300_000 and entry["uuid"].startswith("SIM-")
    plant.round(1.0)
    assert plant.utilization == pytest.approx(0.5)
    assert plant.values[("gpu_power_limit_watts", "")] == 200.0

    low = PowerCap(gpu="0", watts=10.0, rules=("hot",), reasons=("hot",))
    capper.apply({"hot": low})
    assert capper.capped == {"0": 150.0}, "clamped to the lowest limit, as on a real GPU"
    assert capper.apply({}) == [("restore", "0", None)]
    assert plant.sampler.power_limits.get(0) == 300.0 and journal.holds() == {}
    # release-all after a crash: the simulated limit died with its daemon
    assert undo_checked(entry) == (
        True, "gpu 0: simulated, its power limit went with the daemon that set it")
    capper.close()


# --- sensor lag and noise ---


def test_lag_delays_the_reported_temperature_by_the_given_seconds(tmp_path: Path) -> None:
    plant = Plant(tmp_path, "lag = 3\n")
    truth = [30.0]
    for _ in range(10):
        plant.round(1.0)
        truth.append(heated(truth[-1], 1.0, 1.0))
        seconds = len(truth) - 1
        expected = truth[seconds - 3] if seconds >= 3 else 30.0
        assert plant.temperature == pytest.approx(expected, abs=0.01), seconds


def test_lag_is_exact_between_rounds(tmp_path: Path) -> None:
    """Rounds 2 s apart, a lag of 3 s: the sensor reports the model between two rounds."""
    plant = Plant(tmp_path, "lag = 3\n")
    plant.round(2.0)
    plant.round(2.0)  # t = 4: the true temperature at t = 1
    assert plant.temperature == pytest.approx(heated(30.0, 1.0, 1.0), abs=0.01)
    plant.busy = False
    plant.round(2.0)  # t = 6: at t = 3, still heating
    assert plant.temperature == pytest.approx(heated(30.0, 1.0, 3.0), abs=0.01)
    plant.round(2.0)  # t = 8: at t = 5, a second into the cooling
    assert plant.temperature == pytest.approx(heated(heated(30.0, 1.0, 4.0), 0.0, 1.0),
                                              abs=0.01)


def test_noise_has_the_given_deviation_and_is_reproducible(tmp_path: Path) -> None:
    def run(seed: int) -> list[float]:
        plant = Plant(tmp_path, f"noise = 0.5\nseed = {seed}\n", busy=False)
        return [plant.round(1.0)[("gpu_temperature_celsius", "")] - 30.0 for _ in range(2000)]

    first = run(7)
    assert statistics.pstdev(first) == pytest.approx(0.5, rel=0.05)
    assert abs(statistics.fmean(first)) < 0.05
    assert run(7) == first, "the same seed, the same noise"
    assert run(8) != first


# --- the firmware's own slowdown ---


def test_the_slowdown_halves_utilization_above_slowdown_at_and_reports_it(
        tmp_path: Path) -> None:
    plant = Plant(tmp_path, "slowdown_at = 35\n")
    assert plant.values[("gpu_clock_event_active", "hw_thermal")] == 0.0
    assert {reason for metric, reason in plant.values if metric == "gpu_clock_event_active"} == {
        "gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown", "sync_boost",
        "sw_thermal", "hw_thermal", "hw_power_brake", "display_clock_setting"}
    plant.round(1.0)  # 30 -> 39.5 at full speed
    assert plant.utilization == pytest.approx(1.0)
    assert plant.values[("gpu_clock_event_active", "hw_thermal")] == 0.0
    hot = plant.temperature
    assert hot > 35
    plant.round(1.0)  # above slowdown_at: the firmware halves the utilization
    assert plant.utilization == pytest.approx(0.5)
    assert plant.values[("gpu_clock_event_active", "hw_thermal")] == 1.0
    assert plant.values[("gpu_power_watts", "")] == pytest.approx(50 + 250 * 0.5)
    assert plant.temperature == pytest.approx(heated(hot, 0.5, 1.0), abs=0.01)


def test_a_capped_gpu_with_slowdown_at_reports_sw_power_cap(tmp_path: Path) -> None:
    plant = Plant(tmp_path, "slowdown_at = 90\npower_limit = 175\n")
    plant.round(1.0)
    assert plant.utilization == pytest.approx(0.5)
    assert plant.values[("gpu_clock_event_active", "sw_power_cap")] == 1.0
    assert plant.values[("gpu_clock_event_active", "hw_thermal")] == 0.0


# --- ambient step and the steady speed ---


def test_an_ambient_step_moves_the_equilibrium(tmp_path: Path) -> None:
    plant = Plant(tmp_path, "ambient_step = {at = 60, by = 5}\n", busy=False)
    plant.round(30.0)
    assert plant.temperature == 30.0
    plant.round(40.0)  # t = 70: ten seconds toward 35
    assert plant.temperature == pytest.approx(35 - 5 * math.exp(-0.1 * 10), abs=0.01)
    plant.round(500.0)
    assert plant.temperature == pytest.approx(35.0, abs=0.01)
    plant.busy = True
    plant.round(500.0)
    assert plant.temperature == pytest.approx(35 + 10 / 0.1, abs=0.01)


def test_steady_speed_settles_at_the_target(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(BASE + "ambient_step = {at = 60, by = 5}\n")
    spec = load_scenario(path).gpu[0]
    speed = steady_speed(spec, 70.0)
    assert speed == pytest.approx(0.1 * (70 - 30) / 10)
    assert spec.ambient + spec.heat * speed / spec.cool == pytest.approx(70.0)
    assert steady_speed(spec, 70.0, ambient=spec.ambient_at(61)) == pytest.approx(0.35)
    assert steady_speed(spec, 500.0) == 1.0 and steady_speed(spec, 20.0) == 0.0


# --- how busy a job keeps its GPU, and the trace of the true state ---


def test_busy_cores_is_the_cpu_that_keeps_the_gpu_fully_busy(tmp_path: Path) -> None:
    plant = Plant(tmp_path, "busy_cores = 4\n")
    plant.round(1.0)  # one busy core of four
    assert plant.utilization == pytest.approx(0.25)
    assert plant.temperature == pytest.approx(heated(30.0, 0.25, 1.0), abs=0.01)
    half = Plant(tmp_path, "busy_cores = 0.5\n")
    half.round(1.0)  # a whole core is more than enough: capped at 1
    assert half.utilization == pytest.approx(1.0)


def test_the_trace_records_the_true_state_each_round(tmp_path: Path) -> None:
    """Relative to the scenario's folder; the truth besides what a lagging, noisy sensor
    reported; appended to, one line a round."""
    plant = Plant(tmp_path, 'lag = 2\nnoise = 0.3\ntrace = "truth.csv"\n'
                  "ambient_step = {at = 2, by = 5}\npower_limit = 175\nslowdown_at = 90\n")
    for _ in range(3):
        plant.round(1.0)
    plant.sampler.close()
    lines = (tmp_path / "truth.csv").read_text().splitlines()
    assert lines[0] == "seconds,temperature,reported,utilization,hw_slowdown,power_limit,ambient"
    rows = [[float(v) for v in line.split(",")] for line in lines[1:]]
    assert [row[0] for row in rows] == [0.0, 1.0, 2.0, 3.0]
    truth = [30.0, heated(30.0, 0.5, 1.0)]
    truth.append(heated(truth[-1], 0.5, 1.0))
    truth.append(heated(truth[-1], 0.5, 1.0, ambient=35.0))
    assert [row[1] for row in rows] == pytest.approx(truth, abs=1e-3)
    assert rows[3][2] == pytest.approx(truth[1], abs=1.5)  # 2 s late, with noise
    assert [row[3] for row in rows] == [0.0, 0.5, 0.5, 0.5]
    assert [row[4] for row in rows] == [0.0] * 4
    assert [row[5] for row in rows] == [175.0] * 4
    assert [row[6] for row in rows] == [30.0, 30.0, 35.0, 35.0]


def test_a_trace_that_cannot_be_written_is_not_fatal(tmp_path: Path) -> None:
    plant = Plant(tmp_path, 'trace = "no/such/folder/truth.csv"\n')
    plant.round(1.0)
    assert plant.temperature == pytest.approx(heated(30.0, 1.0, 1.0), abs=0.01)


@pytest.mark.parametrize(("keys", "message"), [
    ("busy_cores = 0\n", "gpu[0].busy_cores: Input should be greater than 0"),
    ("power_limit = 200\npower_limit_min = 250\n", "gpu[0].power_limit_min: is above power_limit"),
    ("power_limit_max = 250\n", "gpu[0].power_limit_max: is below power_limit"),
    ("lag = -1\n", "gpu[0].lag: Input should be greater than or equal to 0"),
    ("seed = 1.5\n", "gpu[0].seed: Input should be a valid integer"),
    ("ambient_step = {at = 1}\n", "gpu[0].ambient_step.by: Field required"),
])
def test_a_bad_new_key_is_named(tmp_path: Path, keys: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BASE + keys)
    with pytest.raises(ScenarioError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_scenario(path)


def test_a_power_cap_rule_caps_a_simulated_gpu_in_the_daemon(
        daemon: Callable[..., DaemonProcess], tmp_path: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    """The daemon hands PowerCapper the simulated GPUs' NVML stand-in: a power_cap rule is
    enforceable without root or NVML, and the GPU reports the limit it set."""
    scenario = tmp_path / "scenario.toml"
    scenario.write_text("[[gpu]]\nambient = 40\nstart = 40\nheat = 1\ncool = 1\n")
    rule = {"name": "cap", "metric": "gpu_temperature_celsius", "above": 35.0, "for": 0,
            "clear_below": 30.0, "action": "power_cap", "power_cap_watts": 250}
    d = daemon({"daemon": {"interval": 0.1}, "rules": [rule],
                "sources": {"nvml": "off", "simulate": str(scenario)}})
    assert d.get("/v1/rules").json()[0]["enforceable"] is True
    d.register(name="on-gpu0", pid=spawn(children, ["sleep", "60"]), devices=["gpu0"])
    eventually(lambda: 'governor_gpu_power_limit_watts{gpu="0"} 250.0' in d.metrics())
    assert 'governor_gpu_power_cap_watts{gpu="0"} 250.0' in d.metrics()


def test_power_capper_reads_the_range_a_hold_rule_sets_the_limit_in(tmp_path: Path) -> None:
    """via = "power_limit": the driver's lowest limit and the original one, in W; the
    original stays the one journalled while the GPU is capped."""
    plant = Plant(tmp_path, "power_idle = 100\npower_max = 300\npower_limit_min = 150\n")
    capper = PowerCapper(Journal(tmp_path / "state"), nvml=plant.sampler.nvml,
                         is_root=lambda: True)
    assert capper.limit_range("0") == (150.0, 300.0)
    capper.apply({"h": PowerCap(gpu="0", watts=200.0, rules=("h",), reasons=("h",))})
    assert capper.limit_range("0") == (150.0, 300.0), "the original, not the limit in force"
    assert capper.limit_range("7") is None, "no such GPU"
    assert PowerCapper(Journal(tmp_path / "other"), nvml=plant.sampler.nvml,
                       is_root=lambda: False).limit_range("0") is None
