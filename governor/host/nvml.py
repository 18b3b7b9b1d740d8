"""NVML, loaded in one place for the samplers and the actuators, as nvitop's libnvml does:
the module to load, and the kinds of its errors.

`GOVERNOR_NVML_MODULE` names another module with pynvml's interface; the test suite uses
it to run the daemon against a fake NVML. It is never needed in production.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType

# NVML return codes (nvml.h); the names of the classes pynvml derives from them differ
# between binding versions, the numbers do not.
ERROR_UNINITIALIZED = 1
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_NO_PERMISSION = 4
ERROR_NOT_FOUND = 6
ERROR_DRIVER_NOT_LOADED = 9
ERROR_LIBRARY_NOT_FOUND = 12
ERROR_FUNCTION_NOT_FOUND = 13
ERROR_GPU_IS_LOST = 15
ERROR_RESET_REQUIRED = 16
ERROR_LIB_RM_VERSION_MISMATCH = 18
ERROR_NO_DATA = 21
ERROR_ARGUMENT_VERSION_MISMATCH = 25
ERROR_GPU_NOT_FOUND = 28

#: the field is not there on this GPU or for this user: no series, no complaint
ABSENT = frozenset({
    ERROR_NOT_SUPPORTED, ERROR_NO_PERMISSION, ERROR_NOT_FOUND, ERROR_NO_DATA,
    ERROR_INVALID_ARGUMENT, ERROR_FUNCTION_NOT_FOUND,
})
#: a newer function this driver or binding cannot serve: try the older one
TRY_OLDER = frozenset({ERROR_FUNCTION_NOT_FOUND, ERROR_ARGUMENT_VERSION_MISMATCH})
#: this GPU is gone until a reset: skip it, keep the others
GPU_GONE = frozenset({ERROR_GPU_IS_LOST, ERROR_GPU_NOT_FOUND, ERROR_RESET_REQUIRED})
#: NVML as a whole stopped answering: shut down and initialise again
NVML_GONE = frozenset({
    ERROR_UNINITIALIZED, ERROR_DRIVER_NOT_LOADED, ERROR_LIB_RM_VERSION_MISMATCH,
})


def load_module() -> ModuleType:
    """`pynvml` (from nvidia-ml-py), or the module GOVERNOR_NVML_MODULE names."""
    return importlib.import_module(os.environ.get("GOVERNOR_NVML_MODULE", "pynvml"))


def error_code(exc: BaseException) -> int:
    """The NVML return code of an NVMLError; -1 for anything else. pynvml's
    NVMLLibraryMismatchError stands for FunctionNotFound (the driver lacks the versioned
    function the binding asked for) and carries no code."""
    if type(exc).__name__ == "NVMLLibraryMismatchError":
        return ERROR_FUNCTION_NOT_FOUND
    return int(getattr(exc, "value", -1))


class UuidIndex:
    """A GPU's NVML index (the N of governor's `gpuN`) from the id a device plugin gives
    a pod: a GPU UUID ("GPU-..."), a MIG device UUID ("MIG-...", answered with its parent
    GPU's index), or a plain index (the NVIDIA plugin's `index` strategy). NVML is
    initialised on first use and kept; answers are kept while it stays up."""

    def __init__(self) -> None:
        self._nvml: ModuleType | None = None
        self._known: dict[str, int] = {}

    def index(self, device_id: str) -> int:
        """The index; raises LookupError naming why when NVML cannot match it."""
        device_id = strip_replica(device_id)
        if device_id.isdigit():
            return int(device_id)
        if device_id in self._known:
            return self._known[device_id]
        nvml = self._load()
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(device_id)
            if device_id.startswith("MIG-"):
                handle = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
            index = int(nvml.nvmlDeviceGetIndex(handle))
        except Exception as exc:
            code = error_code(exc)
            if code in NVML_GONE:
                self.close()
            raise LookupError(f"NVML has no device {device_id}: {exc}") from None
        self._known[device_id] = index
        return index

    def _load(self) -> ModuleType:
        if self._nvml is None:
            try:
                nvml = load_module()
                nvml.nvmlInit()
            except Exception as exc:
                raise LookupError(f"NVML cannot be loaded: {exc}") from None
            self._nvml = nvml
        return self._nvml

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None
        self._known.clear()


def strip_replica(device_id: str) -> str:
    """A device id without the time-slicing replica suffix the NVIDIA device plugin adds
    when it shares a GPU ("GPU-...::2")."""
    return device_id.split("::", 1)[0]
