"""The end-to-end tests' scenario: a daemon on the fixture sysfs tree whose rule pauses
jobs when the coretemp package sensor passes 80 °C, the sensor heated by writing its
file, and real child processes to hold."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.processes import busy_child, state

PACKAGE = "devices/platform/coretemp.0/hwmon/hwmon0/temp1_input"
ROOT = os.geteuid() == 0

CPU_HOT = {"name": "cpu-hot", "metric": "cpu_temperature_celsius",
           "match": {"chip": "platform_coretemp_0", "sensor": "Package id 0"},
           "above": 80.0, "for": 0, "clear_below": 70.0, "clear_for": 0, "action": "pause"}


def config(sys_tree: Path, proc_tree: Path, *rules: dict[str, Any], **sections: Any) -> dict[
        str, Any]:
    base: dict[str, Any] = {
        "daemon": {"interval": 0.1},
        "sources": {"sysfs_root": str(sys_tree), "procfs_root": str(proc_tree)},
        "rules": list(rules) or [CPU_HOT],
    }
    for name, body in sections.items():
        base.setdefault(name, {}).update(body)
    return base


def heat(sys_tree: Path, celsius: float, path: str = PACKAGE) -> None:
    (sys_tree / path).write_text(f"{int(celsius * 1000)}\n")


def spawn(children: list[subprocess.Popen[bytes]], argv: list[str] | None = None) -> int:
    child = subprocess.Popen(argv) if argv else busy_child()
    children.append(child)
    return child.pid


def stopped(pid: int) -> Callable[[], bool]:
    return lambda: state(pid) == "T"


def running(pid: int) -> Callable[[], bool]:
    return lambda: state(pid) in "RS"
