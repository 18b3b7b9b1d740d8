"""The `governor` command: exit codes, one-line errors, `sample` and `check-config`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.c_nvml import CNvmlState
from tests.support.cli import governor
from tests.support.daemon import REPO, DaemonProcess, to_toml
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


def test_a_refused_token_names_the_config_and_token_file_the_cli_used(
        tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    """The CLI found another config than the daemon's (an old /etc/governor from `make
    install`): the daemon refuses its token, and the error says which config and token
    file the CLI read, and how to point it at the right one."""
    d = daemon({"daemon": {"interval": 0.25}, "sources": {"nvml": "off"}})
    other_token = tmp_path / "other-token"
    other_token.write_text("not-the-daemons-token\n")
    other = tmp_path / "other.toml"
    other.write_text(to_toml({"api": {"listen": f"127.0.0.1:{d.port}",
                                      "token_file": str(other_token)}}))
    result = governor("register", "--name", "x", "--pid", str(os.getpid()),
                      env={"GOVERNOR_CONFIG": str(other)})
    assert result.returncode != 0
    assert "The token is wrong." in result.stderr
    assert f"config: {other}" in result.stderr
    assert f"token file: {other_token}" in result.stderr
    assert "GOVERNOR_CONFIG" in result.stderr


@pytest.mark.parametrize("argv", [
    ["-v", "--config", "{missing}", "jobs"],
    ["jobs", "-v", "--config", "{missing}"],
    ["--config", "{missing}", "register", "--name", "x", "--cooperative"],
    ["-v", "register", "--config", "{missing}", "--name", "x", "--cooperative"],
])
def test_global_flags_stand_before_or_after_the_verb(tmp_path: Path, argv: list[str]) -> None:
    """-v and --config are global: before the verb or after it, the verb reads the config
    named (here one that is missing, which the error names)."""
    missing = tmp_path / "missing.toml"
    result = governor(*[a.format(missing=missing) for a in argv])
    assert result.returncode == 1, result.stderr
    assert f"{missing}: no such file" in result.stderr


def test_readme_cli_table_lists_every_verb_and_option() -> None:
    """README's CLI table is checked against the parser: a verb or an option added to the
    parser and not to the table fails here (the global --config and -v, and --help,
    are said once, under the table)."""
    import argparse
    import re

    from governor.cli.main import build_parser

    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## CLI\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = line.split(" | ")
        for verb in re.findall(r"`governor ([a-z-]+)", cells[0]):
            rows[verb] = rows.get(verb, "") + cells[0]
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    global_options = {"--config", "-v", "--verbose", "-h", "--help"}
    for verb, sub in verbs.choices.items():
        assert verb in rows, f"README's CLI table has no row for `governor {verb}`"
        for action in sub._actions:
            for option in action.option_strings:
                if option in global_options or not option.startswith("--"):
                    continue
                assert option in rows[verb], (
                    f"README's CLI row for `governor {verb}` does not mention {option}")
