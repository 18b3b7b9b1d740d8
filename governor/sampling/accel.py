"""Compute accelerators under /sys/class/accel (Intel NPU and the like).

The Intel NPU driver exposes `npu_busy_time_us`, a running total of busy time; the
utilization ratio is its growth over the wall time between two rounds, so the first
round after a device appears has no utilization series yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from governor.catalog import MetricSpec
from governor.sampling.base import SampleResult, SamplerUnavailable
from governor.sampling.paths import Garbage, SysPaths, link_name, read_int_strict, sorted_entries
from governor.snapshot import reading

if TYPE_CHECKING:
    from governor.sampling.registry import SamplerContext

BUSY_COUNTERS = ("npu_busy_time_us",)

#: the busy share of any accelerator, whatever its driver; the amdgpu sampler produces
#: it too, for its cards, and declares this same spec
UTILIZATION = MetricSpec(
    "accelerator_utilization_ratio",
    "Share of time an accelerator (amdgpu, NPUs under /sys/class/accel) was busy.",
    ("device", "driver"),
    "device",
)

#: what this sampler produces (the catalog is assembled from such declarations)
METRICS: tuple[MetricSpec, ...] = (UTILIZATION,)


class AccelSampler:
    name = "accel"

    def __init__(self, paths: SysPaths, clock: Callable[[], float] = time.monotonic):
        self._paths = paths
        self._clock = clock
        #: device -> (busy microseconds, clock) at the previous round
        self._last: dict[str, tuple[int, float]] = {}

    def sample(self) -> SampleResult:
        devices = sorted_entries(self._paths.sys("class", "accel"), "accel")
        if not devices:
            raise SamplerUnavailable(
                f"no accelerators under {self._paths.sys('class', 'accel')}"
            )
        result = SampleResult()
        seen = set()
        for device in devices:
            seen.add(device.name)
            self._sample_device(device, result)
        for gone in set(self._last) - seen:
            del self._last[gone]
        return result

    def _sample_device(self, device: Path, result: SampleResult) -> None:
        driver = link_name(device / "device" / "driver") or "unknown"
        for counter in BUSY_COUNTERS:
            try:
                busy_us = read_int_strict(device / "device" / counter)
            except Garbage as exc:
                result.problems.append(str(exc))
                self._last.pop(device.name, None)
                return
            if busy_us is None:
                continue
            now = self._clock()
            previous = self._last.get(device.name)
            self._last[device.name] = (busy_us, now)
            if previous is None:
                return
            busy_before, then = previous
            elapsed_us = (now - then) * 1e6
            if elapsed_us <= 0 or busy_us < busy_before:  # counter reset: wait a round
                return
            ratio = min(1.0, (busy_us - busy_before) / elapsed_us)
            result.readings.append(
                reading("accelerator_utilization_ratio", ratio, device=device.name, driver=driver)
            )
            return

    def close(self) -> None:
        pass


def from_context(context: SamplerContext) -> AccelSampler:
    """The accel sampler's entry in governor/sampling/registry.py."""
    return AccelSampler(context.paths)
