"""The demo's simulated GPUs: a thermal model heated by the CPU its jobs really use.

A fixture procfs holds the jobs' /proc/PID/stat, whose CPU ticks the test advances; a
fake clock gives the time between rounds. Config keys for cooperative jobs
([policy] max_defer, rules' defer, sources.simulate) are checked here too.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from governor.config import ConfigError, parse_config
from governor.sampling.paths import SysPaths
from governor.sampling.simulated import (
    CLOCK_TICKS,
    ScenarioError,
    SimulatedSampler,
    load_scenario,
)
from tests.support.simulated import Clock, write_stat

REPO = Path(__file__).resolve().parents[1]
SCENARIO = """
[[gpu]]
name = "SIM-test"
ambient = 30
heat = 10
cool = 0.1
start = 40

[[gpu]]
heat = 10.0
cool = 0.1
"""


def values(sampler: SimulatedSampler) -> dict[tuple[str, str], float]:
    return {(r.metric, dict(r.labels)["gpu"]): r.value for r in sampler.sample().readings
            if r.metric != "gpu_info"}


@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(SCENARIO)
    return path


def test_a_busy_job_heats_its_gpu_and_a_held_one_lets_it_cool(scenario: Path,
                                                              tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write_stat(proc, 4242, 0)
    clock = Clock()
    sampler = SimulatedSampler(load_scenario(scenario), SysPaths(tmp_path, proc),
                               lambda: [(4242, ["gpu0"])], clock=clock)
    first = values(sampler)
    assert first[("gpu_temperature_celsius", "0")] == 40.0
    assert first[("gpu_temperature_celsius", "1")] == 30.0, "start defaults to ambient"
    assert first[("gpu_utilization_ratio", "0")] == 0.0, "no rate before a second round"

    clock.now += 2.0
    write_stat(proc, 4242, 2 * CLOCK_TICKS)  # two seconds of CPU in two seconds
    busy = values(sampler)
    settled = 30 + 10 / 0.1
    expected = settled + (40 - settled) * math.exp(-0.1 * 2)
    assert busy[("gpu_utilization_ratio", "0")] == pytest.approx(1.0)
    assert busy[("gpu_temperature_celsius", "0")] == pytest.approx(expected, abs=0.01)
    assert busy[("gpu_temperature_celsius", "1")] == 30.0, "gpu1 has no job"
    assert busy[("gpu_power_watts", "0")] == 300.0

    clock.now += 5.0  # held: no CPU used
    held = values(sampler)
    assert held[("gpu_utilization_ratio", "0")] == 0.0
    cooled = 30 + (expected - 30) * math.exp(-0.1 * 5)
    assert held[("gpu_temperature_celsius", "0")] == pytest.approx(cooled, abs=0.01)


def test_utilization_is_capped_and_gone_or_reused_pids_count_for_nothing(
        scenario: Path, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid in (1, 2):
        write_stat(proc, pid, 0)
    clock = Clock()
    jobs = [(1, ["gpu0"]), (2, ["gpu0"]), (3, ["gpu0"])]
    sampler = SimulatedSampler(load_scenario(scenario), SysPaths(tmp_path, proc),
                               lambda: jobs, clock=clock)
    sampler.sample()
    clock.now += 1.0
    for pid in (1, 2):
        write_stat(proc, pid, CLOCK_TICKS)
    assert values(sampler)[("gpu_utilization_ratio", "0")] == 1.0, "two busy jobs: capped"
    clock.now += 1.0
    write_stat(proc, 1, 50 * CLOCK_TICKS, started=9999)  # pid 1 is another process now
    write_stat(proc, 2, CLOCK_TICKS)
    assert values(sampler)[("gpu_utilization_ratio", "0")] == 0.0


def test_gpus_look_like_nvml_gpus(scenario: Path, tmp_path: Path) -> None:
    sampler = SimulatedSampler(load_scenario(scenario), SysPaths(tmp_path, tmp_path))
    readings = sampler.sample().readings
    info = [dict(r.labels) for r in readings if r.metric == "gpu_info"]
    assert [i["gpu"] for i in info] == ["0", "1"]
    assert all(i["uuid"].startswith("SIM-") for i in info) and info[0]["name"] == "SIM-test"
    assert {r.metric for r in readings} == {
        "gpu_info", "gpu_utilization_ratio", "gpu_temperature_celsius", "gpu_power_watts",
        "gpu_power_limit_watts", "gpu_memory_used_bytes", "gpu_memory_total_bytes"}


@pytest.mark.parametrize(("text", "message"), [
    ("[[gpu]]\ncool = 0.1\n", "gpu[0].heat: Field required"),
    ("[[gpu]]\nheat = 1\ncool = 0\n", "gpu[0].cool: Input should be greater than 0"),
    ("[[gpu]]\nheat = 1\ncool = 1\npower_idle = 90\npower_max = 10\n",
     "gpu[0].power_max: is below power_idle"),
    ("[[gpu]]\nheat = 1\ncool = 1\nfan = 3\n", "gpu[0].fan: Extra inputs are not permitted"),
    ("gpu = []\n", "gpu: List should have at least 1 item"),
    ("[[gpu]\n", "not valid TOML"),
])
def test_a_bad_scenario_names_its_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_scenario(path)


def test_the_demo_scenario_and_config_are_valid() -> None:
    assert len(load_scenario(REPO / "config/demo/scenario.toml").gpu) == 2


def problems(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return [str(p) for p in caught.value.problems]


def test_config_keys_for_cooperative_jobs(tmp_path: Path) -> None:
    config = parse_config({"policy": {"max_defer": "2m"}, "rules": [
        {"name": "hot", "metric": "gpu_temperature_celsius", "above": 90, "defer": False}]})
    assert config.policy.max_defer == 120.0 and config.rules[0].defer is False
    assert parse_config({}).policy.max_defer == 30.0 and parse_config({}).sources.simulate == ""
    assert problems({"policy": {"max_defer": "2h"}}) == [
        "policy.max_defer: must be between 0 and 1h"]
    assert problems({"policy": {"max_deferral": 1}}) == ["policy.max_deferral: unknown key"]
    assert problems({"rules": [{"name": "x", "metric": "gpu_temperature_celsius",
                                "above": 1, "defer": "no"}]})[0].startswith(
        'rules[0].defer (rule "x"): should be a valid boolean')
    missing = tmp_path / "nowhere.toml"
    assert problems({"sources": {"simulate": str(missing)}}) == [
        f"sources.simulate: no such file: {missing}"]
