"""NVML, loaded in one place for the samplers and the actuators, as nvitop's libnvml does:
the module to load, and the kinds of its errors.

`GOVERNOR_NVML_MODULE` names another module with pynvml's interface; the test suite uses
it to run the daemon against a fake NVML. It is never needed in production.
"""

from __future__ import annotations

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
    """The NVML return code of an NVMLError; -1 for anything else."""
    return int(getattr(exc, "value", -1))
