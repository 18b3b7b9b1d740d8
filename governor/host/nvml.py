"""NVML, loaded in one place for the samplers and the actuators, as nvitop's libnvml does:
the module to load, and the kinds of its errors.

`GOVERNOR_NVML_MODULE` names another module with pynvml's interface; the test suite uses
it to run the daemon against a fake NVML. It is never needed in production.

Where the NVIDIA library is not installed, pynvml is not imported at all (it is ~1.5 MB
resident, a tenth of what the daemon adds to the interpreter): its stand-in fails
`nvmlInit` as pynvml's would, with the same error code and message.
"""

from __future__ import annotations

import ctypes
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


#: the library pynvml's nvmlInit loads on Linux
LIBRARY = "libnvidia-ml.so.1"


class LibraryNotFound(Exception):
    """What pynvml's nvmlInit raises when it cannot load the library (its
    NVMLError_LibraryNotFound: the same code and message)."""

    value = ERROR_LIBRARY_NOT_FOUND

    def __str__(self) -> str:
        return "NVML Shared Library Not Found"


def _without_library() -> ModuleType:
    """pynvml's shape on a machine without the library: every NVML call fails as
    pynvml's first one, nvmlInit, would there."""
    module = ModuleType("pynvml_without_library")

    def fail(*_: object) -> None:
        raise LibraryNotFound

    def function(name: str) -> object:
        if name.startswith("nvml"):
            return fail
        raise AttributeError(name)

    module.NVMLError = LibraryNotFound  # type: ignore[attr-defined]
    module.__getattr__ = function  # type: ignore[method-assign]
    return module


def load_module() -> ModuleType:
    """`pynvml` (from nvidia-ml-py), or the module GOVERNOR_NVML_MODULE names; without
    the NVIDIA library, a stand-in whose calls raise LibraryNotFound."""
    name = os.environ.get("GOVERNOR_NVML_MODULE")
    if name:
        return importlib.import_module(name)
    try:
        ctypes.CDLL(LIBRARY)  # as pynvml loads it; a loaded library is not loaded twice
    except OSError:
        return _without_library()
    return importlib.import_module("pynvml")


def error_code(exc: BaseException) -> int:
    """The NVML return code of an NVMLError; -1 for anything else."""
    return int(getattr(exc, "value", -1))
