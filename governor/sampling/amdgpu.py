"""AMD GPUs through the amdgpu driver's sysfs files: busy share, temperatures, power, VRAM.

Each card is labelled by its DRM name (`device="card0"`), which is what a job binds to.
A card in runtime suspend is left alone: on kernels before 6.9, reading its files wakes
it, and polling every second would keep an idle dGPU from ever sleeping.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from governor.catalog import MetricSpec
from governor.sampling.accel import UTILIZATION
from governor.sampling.base import SampleResult, SamplerUnavailable
from governor.sampling.hwmon import read_millicelsius, sensor_labels
from governor.sampling.paths import (
    Garbage,
    SysPaths,
    link_name,
    read_int,
    read_int_strict,
    read_text,
    sorted_entries,
)
from governor.snapshot import reading

if TYPE_CHECKING:
    from governor.sampling.registry import SamplerContext

DRIVER = "amdgpu"

#: what this sampler produces (the catalog is assembled from such declarations); the
#: utilization is the accelerators' common one, declared by the accel sampler
METRICS: tuple[MetricSpec, ...] = (
    UTILIZATION,
    MetricSpec(
        "accelerator_temperature_celsius",
        "Accelerator temperature sensors (amdgpu edge, junction, mem...).",
        ("device", "driver", "sensor"),
        "device",
    ),
    MetricSpec(
        "accelerator_power_watts", "Accelerator power draw.", ("device", "driver"), "device"
    ),
    MetricSpec(
        "accelerator_memory_used_bytes",
        "Accelerator memory in use (amdgpu VRAM).",
        ("device", "driver"),
        "device",
    ),
    MetricSpec(
        "accelerator_memory_total_bytes",
        "Accelerator memory installed (amdgpu VRAM).",
        ("device", "driver"),
        "device",
    ),
)
_CARD = re.compile(r"^card\d+$")
_TEMP_INPUT = re.compile(r"^temp(\d+)_input$")


class AmdgpuSampler:
    name = "amdgpu"

    def __init__(self, paths: SysPaths):
        self._paths = paths

    def _cards(self) -> list[Path]:
        cards = []
        for card in sorted_entries(self._paths.sys("class", "drm"), "card"):
            if _CARD.match(card.name) and link_name(card / "device" / "driver") == DRIVER:
                cards.append(card)
        return cards

    def sample(self) -> SampleResult:
        cards = self._cards()
        if not cards:
            raise SamplerUnavailable(
                f"no amdgpu cards under {self._paths.sys('class', 'drm')}"
            )
        result = SampleResult()
        for card in cards:
            if read_text(card / "device" / "power" / "runtime_status") == "suspended":
                continue
            self._sample_card(card, result)
        return result

    def _sample_card(self, card: Path, result: SampleResult) -> None:
        device = card / "device"
        labels = {"device": card.name, "driver": DRIVER}
        try:
            busy = read_int_strict(device / "gpu_busy_percent")
            if busy is not None:
                result.readings.append(
                    reading("accelerator_utilization_ratio", min(busy, 100) / 100.0, **labels)
                )
        except Garbage as exc:
            result.problems.append(str(exc))
        for name, metric in (
            ("mem_info_vram_used", "accelerator_memory_used_bytes"),
            ("mem_info_vram_total", "accelerator_memory_total_bytes"),
        ):
            value = read_int(device / name)
            if value is not None:
                result.readings.append(reading(metric, value, **labels))
        for hwmon in sorted_entries(device / "hwmon", "hwmon"):
            self._sample_hwmon(hwmon, labels, result)

    def _sample_hwmon(self, hwmon: Path, labels: dict[str, str], result: SampleResult) -> None:
        numbers = []
        for path in sorted(hwmon.glob("temp*_input")):
            match = _TEMP_INPUT.match(path.name)
            if match:
                numbers.append(int(match.group(1)))
        names = sensor_labels(hwmon, sorted(numbers))
        for number in sorted(numbers):
            try:
                celsius = read_millicelsius(hwmon / f"temp{number}_input")
            except Garbage as exc:
                result.problems.append(str(exc))
                continue
            if celsius is not None:
                result.readings.append(
                    reading("accelerator_temperature_celsius", celsius, sensor=names[number],
                            **labels)
                )
        # power1_average on most cards, power1_input on newer ones; microwatts
        microwatts = read_int(hwmon / "power1_average")
        if microwatts is None:
            microwatts = read_int(hwmon / "power1_input")
        if microwatts is not None:
            result.readings.append(reading("accelerator_power_watts", microwatts / 1e6, **labels))

    def close(self) -> None:
        pass


def from_context(context: SamplerContext) -> AmdgpuSampler:
    """The amdgpu sampler's entry in governor/sampling/registry.py."""
    return AmdgpuSampler(context.paths)
