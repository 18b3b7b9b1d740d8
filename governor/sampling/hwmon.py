"""Temperatures from hwmon chips and thermal zones under `sources.sysfs_root`.

Chips are named from their stable device path, as node_exporter does
(`platform_coretemp_0`, `pci0000:00_0000:00:18_3`), never from the `hwmonN` number,
which changes with module load order. CPU chips (coretemp, k10temp, zenpower) and CPU
thermal zones go to `cpu_temperature_celsius`; every other sensor goes to
`hwmon_temperature_celsius`, so a rule on CPU heat never trips on a hot SSD. amdgpu
chips are left to the amdgpu sampler, which labels them by card.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from governor.catalog import MetricSpec
from governor.sampling.base import SampleResult, SamplerUnavailable
from governor.sampling.paths import (
    Garbage,
    OpenFiles,
    SysPaths,
    read_int_strict,
    read_text,
    sorted_entries,
)
from governor.snapshot import reading

if TYPE_CHECKING:
    from governor.sampling.registry import SamplerContext

log = logging.getLogger(__name__)

#: what this sampler produces (the catalog is assembled from such declarations)
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "cpu_temperature_celsius",
        "CPU temperature sensors: coretemp, k10temp, zenpower chips and CPU thermal zones.",
        ("chip", "sensor"),
    ),
    MetricSpec(
        "hwmon_temperature_celsius",
        "Every other hwmon temperature and thermal zone (NVMe, ACPI, board, Wi-Fi...).",
        ("chip", "sensor"),
    ),
)

#: hwmon `name`s of CPU temperature drivers; besides these, any chip whose name starts with
#: "cpu" (cpu_thermal, cpu0_thermal: the hwmon twins of CPU thermal zones on Arm boards)
CPU_CHIPS = frozenset({"coretemp", "k10temp", "k8temp", "zenpower", "via_cputemp"})
#: hwmon chips another sampler reports, labelled by their device
ACCELERATOR_CHIPS = frozenset({"amdgpu"})
#: plausible range for a temperature sensor; outside it the value is a sensor fault
#: (an NVMe drive reporting 65261 °C, a disconnected probe at -128 °C)
PLAUSIBLE_CELSIUS = (-60.0, 250.0)

_TEMP_INPUT = re.compile(r"^temp(\d+)_input$")
_INVALID_CHARS = re.compile(r"[^a-z0-9:_]")


def clean_name(name: str) -> str:
    """node_exporter's cleanMetricName: lower case, [a-z0-9:_] only, no outer underscores."""
    return _INVALID_CHARS.sub("_", name.lower()).strip("_")


def is_cpu_sensor(name: str) -> bool:
    """A CPU chip or thermal zone, by its hwmon name or zone type: coretemp, k10temp...;
    x86_pkg_temp on Intel; cpu-thermal, cpu0_thermal, cpuss0-thermal... on Arm SoCs."""
    return name in CPU_CHIPS or name == "x86_pkg_temp" or name.startswith("cpu")


@dataclass(frozen=True, slots=True)
class Chip:
    path: Path
    #: the driver's name file (coretemp, nvme, acpitz...), or ""
    driver: str
    #: the name derived from the device path, or None when the chip has no device link
    device_name: str | None

    @property
    def fallback_name(self) -> str:
        return clean_name(self.driver) or clean_name(_real_basename(self.path)) or self.path.name


def _real_basename(path: Path) -> str:
    return os.path.basename(os.path.realpath(path))


def device_name(chip_dir: Path) -> str | None:
    """`<parent dir>_<device dir>` of the chip's `device` link, e.g. platform_coretemp_0."""
    device = chip_dir / "device"
    if not os.path.exists(device):
        return None
    real = os.path.realpath(device)
    dev_name = clean_name(os.path.basename(real))
    dev_type = clean_name(os.path.basename(os.path.dirname(real)))
    if dev_type and dev_name:
        return f"{dev_type}_{dev_name}"
    return dev_name or None


def chip_names(chips: list[Chip]) -> dict[Path, str]:
    """A unique, stable name per chip.

    The device path names most chips. Several chips on one device (a Wi-Fi card with a
    hwmon per radio) take their driver name instead; chips with no device take their
    driver name, and as a last resort their hwmonN directory name.
    """
    preferred = {c.path: c.device_name or c.fallback_name for c in chips}
    counts = Counter(preferred.values())
    names: dict[Path, str] = {}
    for chip in chips:
        name = preferred[chip.path]
        if counts[name] > 1 and chip.device_name is not None and clean_name(chip.driver):
            name = clean_name(chip.driver)
        names[chip.path] = name
    final_counts = Counter(names.values())
    for chip in chips:
        if final_counts[names[chip.path]] > 1:
            names[chip.path] = f"{names[chip.path]}_{clean_name(chip.path.name)}"
    return names


def _temperature_inputs(directory: Path) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for name in names:
        match = _TEMP_INPUT.match(name)
        if match:
            found.append((int(match.group(1)), directory / name))
    return sorted(found)


def sensor_labels(chip_dir: Path, numbers: list[int]) -> dict[int, str]:
    """Each sensor's `tempN_label`, or `tempN`; labels shared within a chip get `(tempN)`."""
    labels = {n: read_text(chip_dir / f"temp{n}_label") or f"temp{n}" for n in numbers}
    counts = Counter(labels.values())
    return {n: f"{label} (temp{n})" if counts[label] > 1 else label for n, label in labels.items()}


def read_millicelsius(path: Path, files: OpenFiles | None = None) -> float | None:
    """°C from a millidegree file; None when absent; Garbage when implausible or not a number.
    `files`: read through these open files rather than opening it."""
    raw = read_int_strict(path, files.read_text if files is not None else read_text)
    if raw is None:
        return None
    celsius = raw / 1000.0
    low, high = PLAUSIBLE_CELSIUS
    if not low <= celsius <= high:
        raise Garbage(f"{path}: implausible temperature {celsius:g} °C")
    return celsius


@dataclass(frozen=True, slots=True)
class Sensor:
    """One temperature file and the series it gives."""

    path: Path
    metric: str
    chip: str
    sensor: str


class HwmonSampler:
    """Every temperature under class/hwmon and class/thermal.

    Finding the sensors (resolving device paths, reading names and labels) costs several
    times reading them, and changes only when drivers come or go: the layout is kept from
    one round to the next, and scanned again when the chips or zones listed change, when
    a sensor's file vanishes, or every RESCAN_EVERY seconds (a driver adding a sensor)."""

    name = "hwmon"
    RESCAN_EVERY = 30.0

    def __init__(self, paths: SysPaths, clock: Callable[[], float] = time.monotonic):
        self._paths = paths
        self._clock = clock
        #: input file -> the series it gave. A sensor that stops reporting while its chip
        #: is still there (the file vanished, reads fail) is a fault worth a problem, not
        #: the quiet "no data" of a sensor that was never readable
        self._known: dict[Path, str] = {}
        self._layout: list[Sensor] = []
        self._layout_key: tuple[tuple[str, str], ...] | None = None
        self._scanned_at = float("-inf")
        #: the sensors' files, kept open between rounds
        self._files = OpenFiles()

    def _listing(self) -> tuple[tuple[str, str], ...]:
        """The chips and zones, with where their links point: cheap to read every round."""
        listed = []
        for directory, prefix in ((self._paths.sys("class", "hwmon"), "hwmon"),
                                  (self._paths.sys("class", "thermal"), "thermal_zone")):
            for entry in sorted_entries(directory, prefix):
                try:
                    target = os.readlink(entry)
                except OSError:
                    target = ""
                listed.append((entry.name, target))
        return tuple(listed)

    def _chips(self) -> list[Chip]:
        chips = []
        for entry in sorted_entries(self._paths.sys("class", "hwmon"), "hwmon"):
            if not entry.is_dir():  # a dangling link
                continue
            driver = read_text(entry / "name") or ""
            chips.append(Chip(entry, driver, device_name(entry)))
        return chips

    def _scan(self) -> list[Sensor]:
        sensors = []
        chips = [c for c in self._chips() if c.driver not in ACCELERATOR_CHIPS]
        names = chip_names(chips)
        for chip in chips:
            # Old drivers keep their attributes in the device directory.
            inputs = _temperature_inputs(chip.path) or _temperature_inputs(chip.path / "device")
            if not inputs:
                continue
            labels = sensor_labels(inputs[0][1].parent, [n for n, _ in inputs])
            metric = (
                "cpu_temperature_celsius" if is_cpu_sensor(chip.driver)
                else "hwmon_temperature_celsius"
            )
            sensors += [Sensor(path, metric, names[chip.path], labels[number])
                        for number, path in inputs]
        for zone in sorted_entries(self._paths.sys("class", "thermal"), "thermal_zone"):
            zone_type = read_text(zone / "type")
            if zone_type is None:
                continue
            metric = ("cpu_temperature_celsius" if is_cpu_sensor(zone_type)
                      else "hwmon_temperature_celsius")
            sensors.append(Sensor(zone / "temp", metric, zone.name, zone_type))
        return sensors

    def sample(self) -> SampleResult:
        listing, now = self._listing(), self._clock()
        if listing != self._layout_key or now - self._scanned_at >= self.RESCAN_EVERY:
            self._layout, self._layout_key, self._scanned_at = self._scan(), listing, now
            self._files.keep_only(sensor.path for sensor in self._layout)
        if not self._layout:
            raise SamplerUnavailable(
                f"no hwmon chips or thermal zones with temperatures under {self._paths.sysfs}"
            )
        result = SampleResult()
        #: inputs read this round, well or as garbage (already a problem)
        seen: dict[Path, str | None] = {}
        for sensor in self._layout:
            try:
                celsius = read_millicelsius(sensor.path, self._files)
            except Garbage as exc:
                result.problems.append(str(exc))
                seen[sensor.path] = None
                continue
            if celsius is None:  # gone, or a disabled zone that refuses reads
                if not os.path.exists(sensor.path):
                    self._layout_key = None  # look again next round
                continue
            r = reading(sensor.metric, celsius, chip=sensor.chip, sensor=sensor.sensor)
            result.readings.append(r)
            seen[sensor.path] = r.series()
        self._report_vanished(result, seen)
        if self._known.keys() - {sensor.path for sensor in self._layout}:
            self._layout_key = None  # a sensor is out: look for it again each round
        return result

    def _report_vanished(self, result: SampleResult, seen: dict[Path, str | None]) -> None:
        """A problem for each sensor that reported before and not now, while its chip is
        still there; a chip that went away as a whole (a device unplugged) is forgotten."""
        for path, series in list(self._known.items()):
            if path in seen:
                continue
            if os.path.isdir(path.parent):
                result.problems.append(
                    f"{series}: stopped reporting ({path} is gone or unreadable)")
            else:
                log.info("%s: its chip is gone (%s)", series, path.parent)
                del self._known[path]
        self._known.update((path, series) for path, series in seen.items() if series)

    def close(self) -> None:
        self._files.close()


def from_context(context: SamplerContext) -> HwmonSampler:
    """The hwmon sampler's entry in governor/sampling/registry.py."""
    return HwmonSampler(context.paths)
