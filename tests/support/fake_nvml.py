"""A fake NVML in the shape of nvidia-ml-py's `pynvml`, for machines without a GPU.

Errors are the real `pynvml` classes: `pynvml.NVMLError(code)` builds the same subclass
(NVMLError_GpuIsLost, NVMLError_NotSupported...) that the real binding raises, so the
sampler's error handling is exercised as it is against a driver.

State is a dict (in-process tests) or a JSON file named by $FAKE_NVML_STATE, re-read
whenever it changes, so a test can lose a GPU or unload the driver under a running
daemon. The daemon loads this module with GOVERNOR_NVML_MODULE=tests.support.fake_nvml.

State keys (all optional):
  init_error:    error name raised by nvmlInit ("LIBRARY_NOT_FOUND", "DRIVER_NOT_LOADED"...)
  count_error:   error name raised by nvmlDeviceGetCount (a driver unloaded mid-run)
  missing_functions: functions the "driver" lacks (they raise FUNCTION_NOT_FOUND)
  set_power_error: error name raised by nvmlDeviceSetPowerManagementLimit ("NO_PERMISSION")
  gpus: [{uuid, name, utilization, temperature, power_mw, power_limit_mw, power_min_mw,
          power_max_mw, memory_used, memory_total, sm_clock_mhz, clock_events, pids, lost,
          errors: {function: error}}]

Limits set through nvmlDeviceSetPowerManagementLimit are mirrored to `<state>.limits`.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml

# The real module's error classes and constants, re-exported as the binding has them.
NVMLError = pynvml.NVMLError
NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
for _name in dir(pynvml):
    if _name.startswith(("NVMLError_", "NVML_ERROR_")):
        globals()[_name] = getattr(pynvml, _name)


def error(name: str) -> pynvml.NVMLError:
    """The real pynvml exception for an error name like "GPU_IS_LOST"."""
    return pynvml.NVMLError(getattr(pynvml, f"NVML_ERROR_{name}"))


@dataclass
class Utilization:
    gpu: int
    memory: int


@dataclass
class Memory:
    total: int
    free: int
    used: int


@dataclass
class Process:
    pid: int
    usedGpuMemory: int


@dataclass
class Handle:
    index: int


def h100(index: int, **overrides: Any) -> dict[str, Any]:
    """A GPU as an H100 reports it, for building states in tests."""
    gpu = {
        "uuid": f"GPU-00000000-0000-0000-0000-00000000000{index}",
        "name": "NVIDIA H100 80GB HBM3",
        "utilization": 37,
        "temperature": 61,
        "power_mw": 312000,
        "power_limit_mw": 700000,
        "memory_used": 10 * 2**30,
        "memory_total": 80 * 2**30,
        "sm_clock_mhz": 1980,
        "clock_events": 0x4,  # sw_power_cap
        "pids": [],
    }
    gpu.update(overrides)
    return gpu


class FakeNvml:
    """One fake driver. Functions are attributes, as in the pynvml module."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM

    def __init__(self, state: dict[str, Any] | None = None, path: Path | None = None):
        self._state = state if state is not None else {}
        self._path = path
        self._mtime: float | None = None
        self._lock = threading.Lock()
        self.initialized = False
        self.init_calls = 0
        #: how often each function was called: a tally, not a log, as a daemon that loads
        #: this module calls it ~100 times a round and a log would grow by as many
        #: entries (~750 bytes) every round of its life
        self.calls: Counter[str] = Counter()
        #: GPU index -> power limit set through nvmlDeviceSetPowerManagementLimit (mW),
        #: mirrored to <state>.limits so a test, or a later process, sees what was set
        self.set_limits: dict[int, int] = {}
        self.limits_path = Path(f"{path}.limits") if path is not None else None
        if self.limits_path is not None and self.limits_path.exists():
            saved = json.loads(self.limits_path.read_text())
            self.set_limits = {int(k): int(v) for k, v in saved.items()}

    # ---- state ----

    def state(self, reread: bool = False) -> dict[str, Any]:
        """The state; the file is looked at again only when asked (once per round, from
        nvmlInit and nvmlDeviceGetCount), so the fake costs little next to real NVML."""
        if self._path is not None and (reread or self._mtime is None):
            with self._lock:
                mtime = self._path.stat().st_mtime_ns
                if mtime != self._mtime:
                    self._state = json.loads(self._path.read_text())
                    self._mtime = mtime
        return self._state

    def set_state(self, state: dict[str, Any]) -> None:
        self._state = state

    def _call(self, name: str, handle: Handle | None = None) -> dict[str, Any] | None:
        """Record the call, raise what the state says it raises, return the GPU's state."""
        self.calls[name] += 1
        state = self.state()
        if name in state.get("missing_functions", []):
            raise error("FUNCTION_NOT_FOUND")
        if name not in ("nvmlInit", "nvmlShutdown") and not self.initialized:
            raise error("UNINITIALIZED")
        if handle is None:
            return None
        gpus = state.get("gpus", [])
        if handle.index >= len(gpus):
            raise error("GPU_IS_LOST")
        gpu: dict[str, Any] = gpus[handle.index]
        if gpu.get("lost"):
            raise error("GPU_IS_LOST")
        failure = gpu.get("errors", {}).get(name)
        if failure:
            raise error(failure)
        return gpu

    # ---- the pynvml interface ----

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        self.init_calls += 1
        failure = self.state(reread=True).get("init_error")
        if failure:
            raise error(failure)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._call("nvmlSystemGetDriverVersion")
        return "580.159.04"

    def nvmlDeviceGetCount(self) -> int:
        self.state(reread=True)
        self._call("nvmlDeviceGetCount")
        failure = self.state().get("count_error")
        if failure:
            raise error(failure)
        return len(self.state().get("gpus", []))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        handle = Handle(index)
        self._call("nvmlDeviceGetHandleByIndex", handle)
        return handle

    def nvmlDeviceGetUUID(self, handle: Handle) -> str:
        return str(self._field("nvmlDeviceGetUUID", handle, "uuid"))

    def nvmlDeviceGetName(self, handle: Handle) -> str:
        return str(self._field("nvmlDeviceGetName", handle, "name"))

    def nvmlDeviceGetUtilizationRates(self, handle: Handle) -> Utilization:
        return Utilization(gpu=self._field("nvmlDeviceGetUtilizationRates", handle, "utilization"),
                           memory=0)

    def nvmlDeviceGetTemperatureV(self, handle: Handle, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        return int(self._field("nvmlDeviceGetTemperatureV", handle, "temperature"))

    def nvmlDeviceGetTemperature(self, handle: Handle, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        return int(self._field("nvmlDeviceGetTemperature", handle, "temperature"))

    def nvmlDeviceGetPowerUsage(self, handle: Handle) -> int:
        return int(self._field("nvmlDeviceGetPowerUsage", handle, "power_mw"))

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Handle) -> int:
        limit = int(self._field("nvmlDeviceGetEnforcedPowerLimit", handle, "power_limit_mw"))
        return int(self.set_limits.get(handle.index, limit))

    def nvmlDeviceGetMemoryInfo(self, handle: Handle) -> Memory:
        gpu = self._call("nvmlDeviceGetMemoryInfo", handle)
        assert gpu is not None
        used, total = int(gpu["memory_used"]), int(gpu["memory_total"])
        return Memory(total=total, free=total - used, used=used)

    def nvmlDeviceGetClockInfo(self, handle: Handle, clock: int) -> int:
        assert clock == NVML_CLOCK_SM
        return int(self._field("nvmlDeviceGetClockInfo", handle, "sm_clock_mhz"))

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Handle) -> int:
        return int(self._field("nvmlDeviceGetCurrentClocksEventReasons", handle, "clock_events"))

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Handle) -> int:
        return int(self._field("nvmlDeviceGetCurrentClocksThrottleReasons", handle,
                               "clock_events"))

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Handle) -> list[Process]:
        pids = self._field("nvmlDeviceGetComputeRunningProcesses", handle, "pids")
        return [Process(pid=int(p), usedGpuMemory=2**30) for p in pids]

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> Handle:
        self._call("nvmlDeviceGetHandleByUUID")
        wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
        for index, gpu in enumerate(self.state().get("gpus", [])):
            if gpu.get("uuid") == wanted:
                return Handle(index)
        raise error("NOT_FOUND")

    # Power limits. A limit that was set is kept in an overlay, so a test that rewrites the
    # state file (to heat a GPU) does not undo it; it shows as the enforced limit too.

    def nvmlDeviceGetPowerManagementLimit(self, handle: Handle) -> int:
        gpu = self._call("nvmlDeviceGetPowerManagementLimit", handle)
        assert gpu is not None
        return int(self.set_limits.get(handle.index, gpu["power_limit_mw"]))

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: Handle) -> list[int]:
        gpu = self._call("nvmlDeviceGetPowerManagementLimitConstraints", handle)
        assert gpu is not None
        return [int(gpu.get("power_min_mw", 100000)), int(gpu.get("power_max_mw", 700000))]

    def nvmlDeviceSetPowerManagementLimit(self, handle: Handle, limit: int) -> None:
        gpu = self._call("nvmlDeviceSetPowerManagementLimit", handle)
        assert gpu is not None
        failure = self.state().get("set_power_error")
        if failure:
            raise error(failure)
        low, high = self.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        if not low <= limit <= high:
            raise error("INVALID_ARGUMENT")
        self.set_limits[handle.index] = int(limit)
        if self.limits_path is not None:
            self.limits_path.write_text(json.dumps(self.set_limits))

    def _field(self, name: str, handle: Handle, key: str) -> Any:
        gpu = self._call(name, handle)
        assert gpu is not None
        if key not in gpu:  # a field this GPU lacks
            raise error("NOT_SUPPORTED")
        return gpu[key]


def _from_env() -> FakeNvml:
    path = os.environ.get("FAKE_NVML_STATE")
    return FakeNvml(path=Path(path)) if path else FakeNvml({"init_error": "LIBRARY_NOT_FOUND"})


_driver: FakeNvml | None = None


def __getattr__(name: str) -> Any:
    """Module attributes delegate to one driver built from $FAKE_NVML_STATE, so this
    module can stand in for `pynvml` itself."""
    global _driver
    if name.startswith("nvml"):
        if _driver is None:
            _driver = _from_env()
        return getattr(_driver, name)
    raise AttributeError(name)
