"""hwmon and thermal zones: stable chip names, labels, CPU vs other sensors."""

from __future__ import annotations

from pathlib import Path

import pytest

from governor.sampling.base import SamplerUnavailable
from governor.sampling.hwmon import HwmonSampler, clean_name, is_cpu_sensor
from governor.sampling.paths import SysPaths


def temps(sys_root: Path) -> dict[tuple[str, str, str], float]:
    result = HwmonSampler(SysPaths(sys_root, "/proc")).sample()
    return {
        (r.metric, r.label("chip") or "", r.label("sensor") or ""): r.value
        for r in result.readings
    }


def test_our_fixture(sys_tree: Path) -> None:
    assert temps(sys_tree) == {
        ("cpu_temperature_celsius", "platform_coretemp_0", "Package id 0"): 55.0,
        ("cpu_temperature_celsius", "platform_coretemp_0", "Core 0"): 52.0,
        ("cpu_temperature_celsius", "platform_coretemp_0", "Core 1"): 53.0,
        ("cpu_temperature_celsius", "pci0000:00_0000:00:18_3", "Tctl"): 61.25,
        ("cpu_temperature_celsius", "pci0000:00_0000:00:18_3", "Tccd1"): 58.5,
        ("cpu_temperature_celsius", "thermal_zone0", "x86_pkg_temp"): 56.0,
        ("hwmon_temperature_celsius", "acpitz", "temp1"): 27.8,
        ("hwmon_temperature_celsius", "acpitz", "temp2"): 29.8,
        ("hwmon_temperature_celsius", "nvme_nvme0", "Composite"): 38.85,
        ("hwmon_temperature_celsius", "nvme_nvme0", "Sensor 1"): 41.85,
        ("hwmon_temperature_celsius", "hwmon5", "temp1"): 40.0,
        ("hwmon_temperature_celsius", "thermal_zone1", "acpitz"): 27.8,
    }


def test_node_exporter_capture(node_exporter_sys: Path) -> None:
    """The temperatures node_exporter's golden output lists for its own fixture."""
    found = temps(node_exporter_sys)
    for chip in ("platform_coretemp_0", "platform_coretemp_1"):
        assert [found[("cpu_temperature_celsius", chip, s)] for s in
                ("Physical id 0", "Core 0", "Core 1", "Core 2", "Core 3")] == [55, 54, 52, 53, 50]
    # no device link and no name: the directory name; two sensors share a label
    assert found[("hwmon_temperature_celsius", "hwmon4", "foosensor (temp1)")] == 55
    assert found[("hwmon_temperature_celsius", "hwmon4", "foosensor (temp2)")] == 54
    # three radios share one device: each takes its driver name
    for i, value in enumerate((55, 56, 57)):
        assert found[("hwmon_temperature_celsius", f"mt7996_phy0_{i}", "temp1")] == value
    assert found[("cpu_temperature_celsius", "thermal_zone0", "cpu-thermal")] == 12.376
    assert len(found) == 10 + 2 + 3 + 1


def test_chip_names_do_not_follow_hwmon_numbers(sys_tree: Path) -> None:
    """Renumbering hwmonN (another module load order) keeps every chip's name."""
    before = temps(sys_tree)
    hwmon = sys_tree / "class" / "hwmon"
    (hwmon / "hwmon0").rename(hwmon / "hwmon9")
    (hwmon / "hwmon1").rename(hwmon / "hwmon0")
    (hwmon / "hwmon9").rename(hwmon / "hwmon1")
    assert temps(sys_tree) == before


def test_amdgpu_chips_are_left_to_the_amdgpu_sampler(sys_tree: Path) -> None:
    assert not any("0b:00" in chip for _, chip, _ in temps(sys_tree))


def test_a_vanished_file_is_no_data(sys_tree: Path) -> None:
    (sys_tree / "devices/platform/coretemp.0/hwmon/hwmon0/temp2_input").unlink()
    found = temps(sys_tree)
    assert ("cpu_temperature_celsius", "platform_coretemp_0", "Core 0") not in found
    assert ("cpu_temperature_celsius", "platform_coretemp_0", "Core 1") in found


def test_garbage_is_reported_and_skipped(sys_tree: Path) -> None:
    (sys_tree / "devices/platform/coretemp.0/hwmon/hwmon0/temp2_input").write_text("N/A\n")
    (sys_tree / "devices/platform/coretemp.0/hwmon/hwmon0/temp3_input").write_text("65261850\n")
    result = HwmonSampler(SysPaths(sys_tree, "/proc")).sample()
    assert len(result.problems) == 2
    assert any("not a number" in p for p in result.problems)
    assert any("implausible temperature 6526" in p for p in result.problems)
    sensors = {r.label("sensor") for r in result.readings}
    assert "Package id 0" in sensors and "Core 0" not in sensors and "Core 1" not in sensors


def test_no_sensors_is_unavailable(empty_sys: Path) -> None:
    with pytest.raises(SamplerUnavailable, match="no hwmon chips or thermal zones"):
        HwmonSampler(SysPaths(empty_sys, "/proc")).sample()


@pytest.mark.parametrize(
    ("name", "cpu"),
    [("coretemp", True), ("k10temp", True), ("k8temp", True), ("zenpower", True),
     ("via_cputemp", True), ("x86_pkg_temp", True), ("cpu-thermal", True),
     ("cpu0_thermal", True), ("cpuss0-thermal", True), ("acpitz", False), ("nvme", False),
     ("iwlwifi_1", False), ("soc_dts0", False)],
)
def test_cpu_sensors_by_chip_name_or_zone_type(name: str, cpu: bool) -> None:
    assert is_cpu_sensor(name) is cpu


@pytest.mark.parametrize(
    ("raw", "clean"),
    [("coretemp.0", "coretemp_0"), ("0000:00:18.3", "0000:00:18_3"), ("Foo Bar-1", "foo_bar_1"),
     ("__x__", "x")],
)
def test_clean_name(raw: str, clean: str) -> None:
    assert clean_name(raw) == clean


PACKAGE = "devices/platform/coretemp.0/hwmon/hwmon0/temp1_input"
PACKAGE_SERIES = 'cpu_temperature_celsius{chip="platform_coretemp_0",sensor="Package id 0"}'


def test_a_sensor_that_vanishes_is_a_problem_while_its_chip_is_there(sys_tree: Path) -> None:
    sampler = HwmonSampler(SysPaths(sys_tree, "/proc"))
    assert sampler.sample().problems == []
    (sys_tree / PACKAGE).unlink()
    result = sampler.sample()
    assert PACKAGE_SERIES not in {r.series() for r in result.readings}
    (problem,) = result.problems
    assert problem.startswith(f"{PACKAGE_SERIES}: stopped reporting (")
    assert problem.endswith("temp1_input is gone or unreadable)")
    assert len(result.readings) == 11, "the chip's other sensors still report"
    (sys_tree / PACKAGE).write_text("61000\n")
    result = sampler.sample()
    assert result.problems == [] and len(result.readings) == 12


def test_garbage_is_one_problem_not_two(sys_tree: Path) -> None:
    sampler = HwmonSampler(SysPaths(sys_tree, "/proc"))
    sampler.sample()
    (sys_tree / PACKAGE).write_text("N/A\n")
    (problem,) = sampler.sample().problems
    assert problem.endswith("temp1_input: not a number: 'N/A'")


def test_a_chip_that_goes_away_as_a_whole_is_forgotten_quietly(sys_tree: Path) -> None:
    import shutil

    sampler = HwmonSampler(SysPaths(sys_tree, "/proc"))
    sampler.sample()
    shutil.rmtree(sys_tree / "devices/pci0000:00/0000:00:1d.0/0000:3d:00.0/nvme/nvme0/hwmon3")
    result = sampler.sample()
    assert result.problems == []
    assert not [r for r in result.readings if r.label("chip") == "nvme_nvme0"]
