"""The `governor` command: exit codes, one-line errors, `sample` and `check-config`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.c_nvml import CNvmlState
from tests.support.cli import governor
from tests.support.daemon import REPO, to_toml
from tests.support.fake_nvml import h100

VERBS = ["run", "check-config", "sample"]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb: str) -> None:
    result = governor(verb, "--help")
    assert result.returncode == 0 and f"usage: governor {verb}" in result.stdout


def test_bad_usage_exits_2() -> None:
    assert governor("frobnicate").returncode == 2
    assert governor("sample", "--no-such-flag").returncode == 2
    bad_window = governor("sample", "--window", "-1")
    assert bad_window.returncode == 2 and "must be more than 0" in bad_window.stderr
    assert governor().returncode == 2


def test_version() -> None:
    from governor import __version__

    assert governor("--version").stdout.strip() == f"governor {__version__}"


def fixture_config(tmp_path: Path, sys_tree: Path, proc_tree: Path) -> Path:
    path = tmp_path / "governor.toml"
    path.write_text(to_toml({"sources": {"sysfs_root": str(sys_tree),
                                         "procfs_root": str(proc_tree)}}))
    return path


def test_sample_table(tmp_path: Path, sys_tree: Path, proc_tree: Path,
                      c_nvml: CNvmlState) -> None:
    c_nvml.write({"gpus": [h100(0, pids=[4242]), h100(1, temperature=88)]})
    config = fixture_config(tmp_path, sys_tree, proc_tree)
    result = governor("sample", "--config", str(config), "--window", "0.05", env=c_nvml.env())
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("Temperatures", "platform_coretemp_0", "Package id 0", "nvme_nvme0",
                     "NVIDIA GPUs", "NVIDIA H100 80GB HBM3", "88 °C", "312 / 700 W",
                     "1980 MHz", "sw_power_cap", "gpu 0 processes: 4242",
                     "Accelerators", "card0", "amdgpu", "edge 45.0 °C", "intel_vpu",
                     "Samplers", "memory used", "25.0%"):
        assert expected in out, f"{expected!r} not in:\n{out}"


def test_sample_json_says_which_samplers_were_unavailable_and_why(
        tmp_path: Path, empty_sys: Path, proc_tree: Path) -> None:
    config = fixture_config(tmp_path, empty_sys, proc_tree)
    result = governor("sample", "--json", "--config", str(config), "--window", "0.05")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    samplers = {s["name"]: s for s in data["samplers"]}
    assert samplers["cpu"]["state"] == "ok"
    assert samplers["hwmon"]["state"] == "unavailable"
    assert "no hwmon chips" in samplers["hwmon"]["error"]
    assert samplers["nvml"]["state"] == "unavailable"
    assert {r["metric"] for r in data["readings"]} >= {"memory_used_ratio", "load_average_tasks"}


def test_sample_with_nvml_required_and_absent_fails(tmp_path: Path,
                                                    c_nvml: CNvmlState) -> None:
    c_nvml.write({"init_error": "DRIVER_NOT_LOADED"})
    config = tmp_path / "governor.toml"
    config.write_text(to_toml({"sources": {"nvml": "required"}}))
    result = governor("sample", "--config", str(config), env=c_nvml.env())
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'governor: sources.nvml = "required" but NVML cannot be used: Driver Not Loaded '
        "(the nvidia kernel module is not loaded)"]


def test_check_config_ok() -> None:
    result = governor("check-config", "config/governor.toml")
    assert result.returncode == 0 and result.stdout.strip() == "config/governor.toml: ok (3 rules)"


def test_check_config_prints_every_error_with_its_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(to_toml({
        "daemon": {"interval": -1},
        "sources": {"nvml": "sometimes"},
        "rules": [{"name": "hot", "metric": "gpu_temperature_celsius", "above": 80,
                   "clear_below": 85, "action": "slow"}],
    }))
    result = governor("check-config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}: daemon.interval: a duration cannot be negative",
        f"{path}: sources.nvml: should be 'auto', 'off' or 'required' (got 'sometimes')",
        f'{path}: rules[0].clear_below (rule "hot"): 85 is above the trip line `above` (80); '
        "hysteresis clears below it",
    ]


def test_check_config_refuses_nan_and_infinity_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "nan.toml"
    path.write_text('''[[rules]]
name = "hot"
metric = "gpu_temperature_celsius"
above = nan

[[rules]]
name = "cap"
metric = "gpu_temperature_celsius"
above = 80.0
action = "power_cap"
power_cap_watts = inf

[[rules]]
name = "hold"
metric = "gpu_temperature_celsius"
action = "hold"
target = nan
''')
    result = governor("check-config", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f'{path}: rules[0].above (rule "hot"): should be a finite number (got nan)',
        f'{path}: rules[1].power_cap_watts (rule "cap"): should be a finite number (got inf)',
        f'{path}: rules[2].target (rule "hold"): should be a finite number (got nan)',
    ]


@pytest.mark.skipif(Path("/etc/governor/governor.toml").exists(),
                    reason="an installed /etc/governor/governor.toml comes first in the search")
def test_check_config_finds_the_file_like_the_daemon(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "governor.toml").write_text("[daemon]\ninterval = 2\n")
    result = governor("check-config", cwd=tmp_path, env={"GOVERNOR_CONFIG": ""})
    assert result.returncode == 0 and "config/governor.toml: ok (0 rules)" in result.stdout


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path: Path, sys_tree: Path,
                                                   proc_tree: Path) -> None:
    """`governor sample | true`: the reader is gone long before governor writes."""
    config = fixture_config(tmp_path, sys_tree, proc_tree)
    result = subprocess.run(
        f"{sys.executable} -m governor sample --config {config} --window 0.05 | true; "
        "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True,
        text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode == 141, "the status of a tool ended by SIGPIPE"
