"""CPU, memory, load and pressure, from `sources.procfs_root`.

It parses /proc/stat, /proc/meminfo, /proc/loadavg and /proc/pressure/* itself rather
than through psutil's module-wide PROCFS_PATH, so the root is per sampler (tests run
several at once) and the parse is the same code under test and in production.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from governor.catalog import MetricSpec
from governor.sampling.base import SampleResult
from governor.sampling.paths import OpenFiles, SysPaths
from governor.snapshot import Reading, reading

if TYPE_CHECKING:
    from governor.sampling.registry import SamplerContext

PSI_RESOURCES = ("cpu", "memory", "io")
LOAD_WINDOWS = ("1m", "5m", "15m")

#: what this sampler produces (the catalog is assembled from such declarations)
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("cpu_utilization_ratio", "Share of time each CPU core was busy.", ("cpu",)),
    MetricSpec("memory_used_ratio", "Share of memory in use (1 - MemAvailable/MemTotal).", ()),
    MetricSpec(
        "pressure_stall_ratio",
        "Pressure stall information: share of time stalled, averaged over 10 s (PSI avg10/100).",
        ("resource", "kind"),
    ),
    MetricSpec(
        "load_average_tasks",
        "Load average: runnable and uninterruptible tasks, averaged over the window.",
        ("window",),
    ),
)


@dataclass(frozen=True, slots=True)
class CpuTimes:
    busy: int
    total: int


def parse_proc_stat(text: str) -> dict[str, CpuTimes]:
    """Per-core jiffies from /proc/stat: {"0": CpuTimes, ...} (the aggregate line is skipped).

    Busy is everything but idle and iowait; guest time is already inside user time.
    """
    cores: dict[str, CpuTimes] = {}
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        values = [int(v) for v in fields[:8]]
        values += [0] * (8 - len(values))
        user, nice, system, idle, iowait, irq, softirq, steal = values
        idle_all = idle + iowait
        total = user + nice + system + idle_all + irq + softirq + steal
        cores[name[3:]] = CpuTimes(busy=total - idle_all, total=total)
    return cores


def utilization(before: Mapping[str, CpuTimes], after: Mapping[str, CpuTimes],
                last: Mapping[str, float] | None = None) -> dict[str, float]:
    """Busy share per core between two /proc/stat reads.

    Every core of `after` gets a value, so a core that is there has its series in every
    round (a blinking series reads as "missing" to a rule and as a gap on a dashboard).
    Two reads inside one clock tick see no time elapse: such a core keeps its `last`
    ratio, or, before it has one (the first round, a core just brought online), its
    average since boot.
    """
    ratios: dict[str, float] = {}
    for core, now in after.items():
        prev = before.get(core)
        elapsed = now.total - prev.total if prev is not None else 0
        if prev is not None and elapsed > 0 and now.busy >= prev.busy:
            ratio = (now.busy - prev.busy) / elapsed
        elif last is not None and core in last:
            ratio = last[core]
        elif now.total > 0:
            ratio = now.busy / now.total
        else:
            continue
        ratios[core] = min(1.0, max(0.0, ratio))
    return ratios


def advance(before: Mapping[str, CpuTimes], after: Mapping[str, CpuTimes]) -> dict[str, CpuTimes]:
    """The next window's start: `after`, but for the cores whose time did not move, which
    keep their older read so that their next window is long enough to measure. A counter
    that went back (a core taken offline and back) starts afresh from `after`."""
    return {core: before[core] if core in before and now.total == before[core].total else now
            for core, now in after.items()}


def parse_meminfo(text: str) -> float | None:
    """Share of memory in use, as psutil and `free` compute it: 1 - MemAvailable/MemTotal."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0])
    total = fields.get("MemTotal")
    if not total:
        return None
    available = fields.get("MemAvailable")
    if available is None:  # kernels before 3.14
        available = fields.get("MemFree", 0) + fields.get("Buffers", 0) + fields.get("Cached", 0)
    return min(1.0, max(0.0, 1.0 - available / total))


def parse_pressure(text: str) -> dict[str, float]:
    """PSI avg10 of each line ("some", "full") as a ratio."""
    kinds: dict[str, float] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key == "avg10":
                kinds[kind] = float(value) / 100.0
    return kinds


def parse_loadavg(text: str) -> tuple[float, float, float]:
    one, five, fifteen = (float(v) for v in text.split()[:3])
    return one, five, fifteen


class CpuSampler:
    """Per-core utilization, memory used, load and PSI from procfs."""

    name = "cpu"

    def __init__(self, paths: SysPaths):
        self._paths = paths
        #: /proc/stat, meminfo, loadavg and pressure/*, kept open between rounds
        self._files = OpenFiles()
        self._stat = paths.proc("stat")
        self._meminfo = paths.proc("meminfo")
        self._loadavg = paths.proc("loadavg")
        self._psi = [(resource, paths.proc("pressure", resource)) for resource in PSI_RESOURCES]
        # Read once now so the first round already has a window to compute utilization over.
        self._last_stat = self._read_stat()
        self._last_ratio: dict[str, float] = {}

    def _read_stat(self) -> dict[str, CpuTimes] | None:
        text = self._files.read_text(self._stat)
        return parse_proc_stat(text) if text is not None else None

    def sample(self) -> SampleResult:
        result = SampleResult()
        stat = self._read_stat()
        if stat is None:
            raise OSError(f"cannot read {self._stat}")
        before = self._last_stat or {}
        self._last_ratio = utilization(before, stat, self._last_ratio)
        for core, ratio in sorted(self._last_ratio.items(), key=_core_key):
            result.readings.append(reading("cpu_utilization_ratio", ratio, cpu=core))
        self._last_stat = advance(before, stat)

        meminfo = self._files.read_text(self._meminfo)
        used = parse_meminfo(meminfo) if meminfo is not None else None
        if used is not None:
            result.readings.append(reading("memory_used_ratio", used))
        else:
            result.problems.append(f"cannot read memory use from {self._meminfo}")

        loadavg = self._files.read_text(self._loadavg)
        if loadavg is not None:
            for window, value in zip(LOAD_WINDOWS, parse_loadavg(loadavg), strict=True):
                result.readings.append(reading("load_average_tasks", value, window=window))

        result.readings.extend(self._pressure())
        return result

    def _pressure(self) -> list[Reading]:
        """PSI series; kernels without PSI (or booted with psi=0) have none, which is no fault."""
        readings = []
        for resource, path in self._psi:
            text = self._files.read_text(path)
            if text is None:
                continue
            for kind, ratio in sorted(parse_pressure(text).items()):
                readings.append(
                    reading("pressure_stall_ratio", ratio, resource=resource, kind=kind)
                )
        return readings

    def close(self) -> None:
        self._files.close()


def _core_key(item: tuple[str, float]) -> int:
    return int(item[0]) if item[0].isdigit() else 1 << 30


def from_context(context: SamplerContext) -> CpuSampler:
    """The cpu sampler's entry in governor/sampling/registry.py."""
    return CpuSampler(context.paths)
