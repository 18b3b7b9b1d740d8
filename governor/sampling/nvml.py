"""NVIDIA GPUs through NVML (`nvidia-ml-py`, imported as `pynvml`).

As glances does: NVML is loaded once, and every field is read on its own, so one field
that fails (NotSupported and NoPermission quietly, anything else as a reported problem)
is simply absent and never hides the rest of the GPU. A lost GPU is reported and skipped
while the others keep reporting. When NVML stops answering as a whole (the driver was
unloaded), the sampler shuts NVML down and initialises it again on later rounds, with
backoff; while it is away the sampler is down (an error, so alerts fire), unless NVML
was never there at all. A driver *upgrade* cannot be picked up in-process, since the old
libnvidia-ml stays loaded: the sampler then says to restart governor.

Loading NVML and the kinds of its errors are in `governor.host.nvml`, which the power
capper uses too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from governor.catalog import MetricSpec
from governor.host.nvml import (
    ABSENT,
    ERROR_DRIVER_NOT_LOADED,
    ERROR_LIB_RM_VERSION_MISMATCH,
    ERROR_LIBRARY_NOT_FOUND,
    ERROR_NO_PERMISSION,
    GPU_GONE,
    NVML_GONE,
    TRY_OLDER,
    error_code,
    load_module,
)
from governor.sampling.base import SampleResult, SamplerUnavailable
from governor.snapshot import Labels, Reading, reading

if TYPE_CHECKING:
    from governor.sampling.registry import SamplerContext

log = logging.getLogger(__name__)

#: what this sampler produces (the catalog is assembled from such declarations); the
#: simulated GPUs produce these too, and declare none of their own
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("gpu_info", "NVIDIA GPU identity; value 1.", ("gpu", "uuid", "name"), "gpu"),
    MetricSpec("gpu_utilization_ratio", "Share of time the GPU was busy.", ("gpu",), "gpu"),
    MetricSpec("gpu_temperature_celsius", "GPU core temperature.", ("gpu",), "gpu"),
    MetricSpec("gpu_power_watts", "GPU power draw.", ("gpu",), "gpu"),
    MetricSpec("gpu_power_limit_watts", "GPU enforced power limit.", ("gpu",), "gpu"),
    MetricSpec("gpu_memory_used_bytes", "GPU memory in use.", ("gpu",), "gpu"),
    MetricSpec("gpu_memory_total_bytes", "GPU memory installed.", ("gpu",), "gpu"),
    MetricSpec("gpu_sm_clock_hertz", "GPU streaming-multiprocessor clock.", ("gpu",), "gpu"),
    MetricSpec(
        "gpu_clock_event_active",
        "1 while NVML reports this clock event (throttle) reason for the GPU, else 0.",
        ("gpu", "reason"),
        "gpu",
    ),
)

#: NVML clock event (throttle) reason bits and their `reason` label
CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x001, "gpu_idle"),
    (0x002, "applications_clocks_setting"),
    (0x004, "sw_power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal"),
    (0x040, "hw_thermal"),
    (0x080, "hw_power_brake"),
    (0x100, "display_clock_setting"),
)

RETRY_FIRST = 1.0
RETRY_MAX = 30.0


class NvmlUnavailableError(RuntimeError):
    """`sources.nvml = "required"` and NVML cannot be used."""


class _GpuGone(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Identity:
    handle: Any
    #: the gpu_info reading: uuid and name
    info: Reading
    #: the labels of each CLOCK_EVENT_REASONS series, in its order
    events: tuple[Labels, ...]


class NvmlSampler:
    name = "nvml"

    def __init__(
        self,
        *,
        required: bool = False,
        nvml: ModuleType | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._nvml = nvml if nvml is not None else load_module()
        #: NVMLError, and the error pynvml raises instead of FunctionNotFound from the
        #: functions it decorates with throwOnVersionMismatch (the process list): an
        #: ordinary outcome on older drivers, not a failed round
        self._error: tuple[type[BaseException], ...] = tuple(
            error for error in (self._nvml.NVMLError,
                                getattr(self._nvml, "NVMLLibraryMismatchError", None))
            if isinstance(error, type) and issubclass(error, BaseException)
        )
        self._clock = clock
        self._initialized = False
        #: why NVML cannot be used now; None while it works
        self.unavailable_reason: str | None = None
        #: the library itself is missing: no retry will find it
        self._permanent = False
        self._retry_delay = RETRY_FIRST
        self._next_retry = 0.0
        #: the first function of each versioned family that this driver has
        self._chosen: dict[str, str] = {}
        self._required = required
        #: NVML has found GPUs since start: if it goes away now, that is a failure
        self._ever_worked = False
        #: problems of single fields of the GPU being read
        self._field_problems: list[str] = []
        #: index -> what does not change while NVML stays initialized: the handle, the
        #: gpu_info reading and the clock event series' labels. Read once per init, not
        #: once a round: 3 of a GPU's 12 calls, and 9 label tuples (issue 15)
        self._identity: dict[int, _Identity] = {}
        self._init()
        if required and self.unavailable_reason is not None:
            raise NvmlUnavailableError(
                f'sources.nvml = "required" but NVML cannot be used: {self.unavailable_reason}'
            )

    # ---- life cycle -------------------------------------------------------------------

    def _code(self, exc: BaseException) -> int:
        return error_code(exc)

    def _init(self) -> None:
        try:
            self._nvml.nvmlInit()
        except self._error as exc:
            code = self._code(exc)
            self._permanent = code == ERROR_LIBRARY_NOT_FOUND
            hint = {
                ERROR_LIBRARY_NOT_FOUND: " (libnvidia-ml.so is not installed: no NVIDIA driver)",
                ERROR_DRIVER_NOT_LOADED: " (the nvidia kernel module is not loaded)",
                ERROR_NO_PERMISSION: " (this user may not open /dev/nvidia*)",
            }.get(code, "")
            self._set_unavailable(f"{exc}{hint}")
            return
        self._initialized = True
        try:
            count = int(self._nvml.nvmlDeviceGetCount())
        except self._error as exc:
            self._shutdown()
            self._set_unavailable(f"{exc}")
            return
        if count == 0:
            self._set_unavailable("NVML found no GPUs")
            return
        self.unavailable_reason = None
        self._ever_worked = True

    def _set_unavailable(self, reason: str) -> None:
        self.unavailable_reason = reason
        self._next_retry = self._clock() + self._retry_delay
        self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)

    def _shutdown(self) -> None:
        self._identity.clear()  # handles are only good until nvmlShutdown
        if self._initialized:
            self._initialized = False
            try:
                self._nvml.nvmlShutdown()
            except self._error as exc:
                log.debug("nvmlShutdown: %s", exc)

    def _lost(self, exc: BaseException) -> None:
        """NVML as a whole stopped answering: start over on a later round, unless the
        driver was upgraded under us, which only a restart can pick up."""
        self._shutdown()
        self._chosen.clear()
        if self._code(exc) == ERROR_LIB_RM_VERSION_MISMATCH:
            self._permanent = True
            self.unavailable_reason = (
                f"NVML stopped answering: {exc}: the NVIDIA driver changed under governor; "
                "restart governor to load the new driver's library")
            log.error("nvml: %s", self.unavailable_reason)
            return
        self._retry_delay = RETRY_FIRST
        self._set_unavailable(f"NVML stopped answering: {exc}")

    def _down(self) -> Exception:
        """Why this round has no GPU readings: a failure if NVML worked before or is
        required (so governor_sampler_up goes to 0), else hardware that is not here."""
        assert self.unavailable_reason is not None
        if self._ever_worked or self._required:
            return RuntimeError(self.unavailable_reason)
        return SamplerUnavailable(self.unavailable_reason)

    def close(self) -> None:
        self._shutdown()

    # ---- sampling ---------------------------------------------------------------------

    def sample(self) -> SampleResult:
        if self.unavailable_reason is not None:
            if self._permanent or self._clock() < self._next_retry:
                raise self._down()
            was = self.unavailable_reason
            self._shutdown()
            self._init()
            if self.unavailable_reason is not None:
                raise self._down()
            log.info("NVML is available again (it was: %s)", was)
        try:
            count = int(self._nvml.nvmlDeviceGetCount())
        except self._error as exc:
            self._lost(exc)
            raise self._down() from exc
        if count == 0:
            self._shutdown()
            self._set_unavailable("NVML found no GPUs")
            raise self._down()

        result = SampleResult()
        failed = 0
        for index in range(count):
            try:
                self._sample_gpu(index, result)
            except _GpuGone as exc:
                self._identity.pop(index, None)  # asked again once it is back
                failed += 1
                result.problems.append(f"gpu {index}: {exc.__cause__ or exc}; skipped")
            except self._error as exc:
                if self._code(exc) in NVML_GONE:
                    self._lost(exc)
                    raise self._down() from exc
                failed += 1
                result.problems.append(f"gpu {index}: {exc}; skipped")
        if failed == count:
            raise RuntimeError("every GPU failed: " + "; ".join(result.problems))
        self._retry_delay = RETRY_FIRST
        return result

    def _get(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One field: None when it cannot be read, _GpuGone when the GPU is lost; NVML
        errors that mean NVML itself is gone propagate."""
        try:
            return fn(*args)
        except self._error as exc:
            return self._field_failed(getattr(fn, "__name__", "?"), exc)

    def _field_failed(self, name: str, exc: BaseException) -> None:
        code = self._code(exc)
        if code in GPU_GONE:
            raise _GpuGone(str(exc)) from exc
        if code in NVML_GONE:
            raise exc
        if code not in ABSENT:
            self._field_problems.append(f"{name}: {exc}")
        return None

    def _get_versioned(self, family: str, names: tuple[str, ...], *args: Any) -> Any:
        """The newest of several functions that the binding and the driver both have.

        nvmlDeviceGetTemperature and ...ThrottleReasons are deprecated in NVML 13; older
        drivers lack their successors and answer FunctionNotFound. pynvml's process list
        asks for `..._v3`, which drivers before R510 lack: `_v2` serves them.
        """
        chosen = self._chosen.get(family)
        candidates = (chosen,) if chosen else names
        for name in candidates:
            fn = getattr(self._nvml, name, None)
            if fn is None:
                continue
            try:
                value = fn(*args)
            except self._error as exc:
                if self._code(exc) in TRY_OLDER and not chosen:
                    continue
                if self._code(exc) in ABSENT:
                    self._chosen[family] = name
                return self._field_failed(name, exc)
            self._chosen[family] = name
            return value
        return None

    def _identify(self, index: int) -> _Identity:
        """The GPU's handle and identity, asked of NVML the first time after an init."""
        known = self._identity.get(index)
        if known is not None:
            return known
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except self._error as exc:
            if self._code(exc) in GPU_GONE:
                raise _GpuGone(str(exc)) from exc
            raise
        gpu = str(index)
        uuid = self._get(nvml.nvmlDeviceGetUUID, handle)
        name = self._get(nvml.nvmlDeviceGetName, handle)
        info = reading("gpu_info", 1, gpu=gpu, uuid=_text(uuid), name=_text(name))
        events = tuple(reading("gpu_clock_event_active", 0.0, gpu=gpu, reason=label).labels
                       for _, label in CLOCK_EVENT_REASONS)
        identity = _Identity(handle, info, events)
        if uuid is not None and name is not None:  # a field that failed is asked again
            self._identity[index] = identity
        return identity

    def _sample_gpu(self, index: int, result: SampleResult) -> None:
        nvml = self._nvml
        self._field_problems = []
        identity = self._identify(index)
        handle = identity.handle
        gpu = str(index)
        readings = [identity.info]

        util = self._get(nvml.nvmlDeviceGetUtilizationRates, handle)
        if util is not None:
            readings.append(reading("gpu_utilization_ratio", min(util.gpu, 100) / 100.0, gpu=gpu))
        temp = self._get_versioned(
            "temperature", ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"),
            handle, nvml.NVML_TEMPERATURE_GPU,
        )
        if temp is not None:
            readings.append(reading("gpu_temperature_celsius", temp, gpu=gpu))
        power = self._get(nvml.nvmlDeviceGetPowerUsage, handle)
        if power is not None:
            readings.append(reading("gpu_power_watts", power / 1000.0, gpu=gpu))
        limit = self._get(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        if limit is not None:
            readings.append(reading("gpu_power_limit_watts", limit / 1000.0, gpu=gpu))
        memory = self._get(nvml.nvmlDeviceGetMemoryInfo, handle)
        if memory is not None:
            readings.append(reading("gpu_memory_used_bytes", memory.used, gpu=gpu))
            readings.append(reading("gpu_memory_total_bytes", memory.total, gpu=gpu))
        sm_mhz = self._get(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM)
        if sm_mhz is not None:
            readings.append(reading("gpu_sm_clock_hertz", sm_mhz * 1e6, gpu=gpu))
        reasons = self._get_versioned(
            "clock_events",
            ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"),
            handle,
        )
        if reasons is not None:
            bits = int(reasons)
            readings += [Reading("gpu_clock_event_active", labels, 1.0 if bits & bit else 0.0)
                         for (bit, _), labels in zip(CLOCK_EVENT_REASONS, identity.events,
                                                     strict=True)]
        processes = self._get_versioned(
            "processes",
            ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2"),
            handle,
        )
        if processes is not None:
            result.gpu_pids[gpu] = frozenset(int(p.pid) for p in processes)
        # Only a GPU read to the end counts: a GPU lost halfway leaves no partial series.
        result.readings.extend(readings)
        result.problems.extend(f"gpu {index}: {p}" for p in self._field_problems)


def from_context(context: SamplerContext) -> NvmlSampler:
    """The nvml sampler's entry in governor/sampling/registry.py. Raises
    NvmlUnavailableError for `sources.nvml = "required"` when NVML cannot be used."""
    return NvmlSampler(required=context.sources.nvml == "required")


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)
