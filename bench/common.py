"""What every benchmark shares: peers from Debian, fixture trees, daemons, result rows.

Timings on these shared machines drift between runs: each benchmark measures governor
and its peer in the same run, one after the other, and reports the ratio.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.daemon import DaemonProcess  # noqa: E402
from tests.support.fake_nvml import h100  # noqa: E402
from tests.support.processes import stop  # noqa: E402

RESULTS = REPO / "bench" / "results.json"


@dataclass
class Row:
    """One line of the table: governor's figure, the peer's, and whether the target is met."""

    name: str
    governor: str
    peer: str = "-"
    ratio: str = "-"
    target: str = "-"
    passed: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)


def ensure_peer(package: str, binary: str) -> tuple[str | None, str]:
    """The peer's path, installing its Debian package when missing; and what happened."""
    found = shutil.which(binary)
    if found:
        return found, f"{package} (present)"
    command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    if os.geteuid() != 0:
        command = ["sudo", "-n", *command]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"  installing the peer {package} with apt-get ...", flush=True)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{package} could not be installed: {exc}"
    found = shutil.which(binary)
    if result.returncode != 0 or not found:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["?"]
        return None, f"{package} could not be installed: {last[0]}"
    return found, f"{package} (installed by the bench with apt-get)"


def build_sysfs(root: Path, chips: int = 8, sensors: int = 4) -> Path:
    """A sysfs tree of `chips` hwmon chips with `sensors` temperatures each (32 by
    default), half of them CPU chips, the rest NVMe drives; plus one CPU thermal zone."""
    sys_root = root / "sys"
    for chip in range(chips):
        cpu = chip % 2 == 0
        device = (sys_root / "devices/platform" / f"coretemp.{chip}" if cpu else
                  sys_root / f"devices/pci0000:00/0000:00:1d.{chip}/nvme/nvme{chip}")
        hwmon = device / "hwmon" / f"hwmon{chip}"
        hwmon.mkdir(parents=True)
        (hwmon / "name").write_text("coretemp\n" if cpu else "nvme\n")
        for sensor in range(1, sensors + 1):
            (hwmon / f"temp{sensor}_input").write_text(f"{40000 + chip * 1000 + sensor}\n")
            (hwmon / f"temp{sensor}_label").write_text(
                (f"Core {sensor - 1}" if cpu else f"Sensor {sensor}") + "\n")
        os.symlink(os.path.relpath(device, hwmon), hwmon / "device")
        link = sys_root / "class/hwmon" / f"hwmon{chip}"
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(hwmon, link.parent), link)
    zone = sys_root / "devices/virtual/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("x86_pkg_temp\n")
    (zone / "temp").write_text("50000\n")
    link = sys_root / "class/thermal/thermal_zone0"
    link.parent.mkdir(parents=True)
    os.symlink(os.path.relpath(zone, link.parent), link)
    return sys_root


def eight_gpus() -> dict[str, Any]:
    return {"gpus": [h100(i, temperature=55 + i) for i in range(8)]}


def cpu_seconds(pid: int, tree: bool = False) -> float:
    """CPU time of a process (all its threads), and with tree=True of its descendants."""
    processes = [psutil.Process(pid)]
    if tree:
        processes += psutil.Process(pid).children(recursive=True)
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def metric(url: str, name: str) -> float:
    """One series' value from an exposition (the first whose name matches)."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"governor-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def daemon(path: Path, config: dict[str, Any], **kwargs: Any) -> Iterator[DaemonProcess]:
    (path / "d").mkdir(exist_ok=True)
    process = DaemonProcess(path / "d", config, **kwargs)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@contextmanager
def children(*argvs: list[str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    started = [subprocess.Popen(argv) for argv in argvs]
    try:
        yield started
    finally:
        for child in started:
            stop(child)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def machine() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": next((line.split(":", 1)[1].strip() for line in
                           Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), platform.processor()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_before": os.getloadavg()[0],
    }


def write_results(rows: list[Row], info: dict[str, Any]) -> None:
    RESULTS.write_text(json.dumps({"machine": info, "rows": [asdict(r) for r in rows]},
                                  indent=2) + "\n")


def table(rows: list[Row]) -> str:
    head = ("benchmark", "governor", "peer", "ratio", "target", "result")
    body = [(r.name, r.governor, r.peer, r.ratio, r.target,
             "-" if r.passed is None else ("PASS" if r.passed else "FAIL")) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
             for x in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
