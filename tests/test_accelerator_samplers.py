"""amdgpu cards and /sys/class/accel devices."""

from __future__ import annotations

from pathlib import Path

import pytest

from governor.sampling.accel import AccelSampler
from governor.sampling.amdgpu import AmdgpuSampler
from governor.sampling.base import SamplerUnavailable
from governor.sampling.paths import SysPaths

NPU_BUSY = "devices/pci0000:00/0000:00:0b.0/npu_busy_time_us"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_amdgpu_card(sys_tree: Path) -> None:
    result = AmdgpuSampler(SysPaths(sys_tree, "/proc")).sample()
    found = {(r.metric, r.label("sensor")): r.value for r in result.readings}
    assert found == {
        ("accelerator_utilization_ratio", None): 0.37,
        ("accelerator_memory_used_bytes", None): 2**30,
        ("accelerator_memory_total_bytes", None): 8 * 2**30,
        ("accelerator_temperature_celsius", "edge"): 45.0,
        ("accelerator_temperature_celsius", "junction"): 52.0,
        ("accelerator_temperature_celsius", "mem"): 48.0,
        ("accelerator_power_watts", None): 35.0,
    }
    assert {(r.label("device"), r.label("driver")) for r in result.readings} == {
        ("card0", "amdgpu")}


def test_amdgpu_power_input_on_newer_cards(sys_tree: Path) -> None:
    hwmon = sys_tree / "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon4"
    (hwmon / "power1_average").rename(hwmon / "power1_input")
    result = AmdgpuSampler(SysPaths(sys_tree, "/proc")).sample()
    assert [r.value for r in result.readings if r.metric == "accelerator_power_watts"] == [35.0]


def test_a_card_in_runtime_suspend_is_not_woken(sys_tree: Path) -> None:
    power = sys_tree / "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/power"
    power.mkdir()
    (power / "runtime_status").write_text("suspended\n")
    result = AmdgpuSampler(SysPaths(sys_tree, "/proc")).sample()
    assert result.readings == [] and result.problems == []
    (power / "runtime_status").write_text("active\n")
    assert AmdgpuSampler(SysPaths(sys_tree, "/proc")).sample().readings


def test_no_amdgpu_is_unavailable(empty_sys: Path) -> None:
    with pytest.raises(SamplerUnavailable):
        AmdgpuSampler(SysPaths(empty_sys, "/proc")).sample()


def test_npu_utilization_is_the_busy_counter_over_wall_time(sys_tree: Path) -> None:
    clock = Clock()
    sampler = AccelSampler(SysPaths(sys_tree, "/proc"), clock=clock)
    assert sampler.sample().readings == []  # the first round only starts the window
    busy = sys_tree / NPU_BUSY
    clock.now += 2.0
    busy.write_text(str(123456789 + 500_000))  # 0.5 s busy in 2 s
    (reading,) = sampler.sample().readings
    assert reading.metric == "accelerator_utilization_ratio"
    assert reading.labels == (("device", "accel0"), ("driver", "intel_vpu"))
    assert reading.value == pytest.approx(0.25)


def test_npu_counter_reset_waits_a_round(sys_tree: Path) -> None:
    clock = Clock()
    sampler = AccelSampler(SysPaths(sys_tree, "/proc"), clock=clock)
    sampler.sample()
    clock.now += 1
    (sys_tree / NPU_BUSY).write_text("10")
    assert sampler.sample().readings == []
    clock.now += 1
    (sys_tree / NPU_BUSY).write_text(str(10 + 1_000_000))
    assert [r.value for r in sampler.sample().readings] == [1.0]


def test_npu_garbage_is_a_problem(sys_tree: Path) -> None:
    (sys_tree / NPU_BUSY).write_text("busy\n")
    result = AccelSampler(SysPaths(sys_tree, "/proc")).sample()
    assert result.readings == [] and "not a number" in result.problems[0]


def test_no_accel_is_unavailable(empty_sys: Path) -> None:
    with pytest.raises(SamplerUnavailable):
        AccelSampler(SysPaths(empty_sys, "/proc")).sample()
