"""A fake NVML at the driver's level: `tests/support/fake_libnvml/fake_nvml.c`, built with
gcc as `libnvidia-ml.so.1`, which the real nvidia-ml-py binding (`pynvml`) loads and
calls as it calls a driver's. Struct layouts, versioned symbols and return codes are
checked by the real binding, and its real NVMLError subclasses come out of it.

`tests/support/fake_nvml.py`, the Python fake, stands in for the binding instead; keep
it for what the C fake cannot do (see its users' comments).

A state is the Python fake's dict (`{"gpus": [h100(0), ...], "init_error": ...}`, with
`pids`, `errors` and `missing_functions` as there), written as the C fake's `key=value`
lines (the format is at the top of fake_nvml.c). A power limit that the library sets is
written back into the file (`gpu.N.power_limit_set_mw`) and kept when a test writes a new
state, as a driver keeps it while the GPU heats up.

A daemon gets the library through `env()` (LD_LIBRARY_PATH, FAKE_NVML_STATE: the real
`pynvml`, no GOVERNOR_NVML_MODULE); a test in this process through `loaded_into_pynvml`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest

SOURCE = Path(__file__).parent / "fake_libnvml" / "fake_nvml.c"
#: git-ignored; one folder per version of the source, so an edit rebuilds
BUILD = Path(__file__).parent / "fake_libnvml" / "build"
LIBRARY = "libnvidia-ml.so.1"

#: the Python fake's keys -> the C fake's field names
_FIELDS = ("uuid", "name", "utilization", "temperature", "power_mw", "power_limit_mw",
           "power_default_mw", "power_min_mw", "power_max_mw", "memory_used", "memory_total",
           "sm_clock_mhz", "clock_events")
#: the Python fake's defaults for a GPU's limit constraints
_DEFAULT_MIN_MW, _DEFAULT_MAX_MW = 100000, 700000


def build() -> Path:
    """The folder holding the built `libnvidia-ml.so.1`; skips the test without gcc."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    folder = BUILD / digest
    library = folder / LIBRARY
    if library.exists():
        return folder
    if gcc is None:
        pytest.skip("gcc is not installed: the C fake NVML (tests/support/fake_libnvml) "
                    "cannot be built")
    folder.mkdir(parents=True, exist_ok=True)
    # No soname: loaded by path in this process, it must not answer a later
    # dlopen("libnvidia-ml.so.1") in place of a real driver's library.
    tmp = folder / f".{LIBRARY}.{os.getpid()}"
    built = subprocess.run(
        ["nice", "-n", "19", gcc, "-O1", "-Wall", "-Wextra", "-shared", "-fPIC",
         "-fvisibility=hidden", "-o", str(tmp), str(SOURCE), "-lpthread"],
        capture_output=True, text=True, check=False,
    )
    if built.returncode != 0:
        raise RuntimeError(f"building {SOURCE.name} failed:\n{built.stderr}")
    tmp.replace(library)  # atomic: parallel builders agree
    return folder


def to_lines(state: dict[str, Any]) -> list[str]:
    """The Python fake's state dict as the C fake's lines."""
    lines = []
    for key in ("init_error", "count_error", "set_power_error", "driver_version"):
        if state.get(key):
            lines.append(f"{key}={state[key]}")
    if state.get("missing_functions"):
        lines.append("missing=" + ",".join(state["missing_functions"]))
    for index, gpu in enumerate(state.get("gpus", [])):
        prefix = f"gpu.{index}."
        lines.append(f"{prefix}present=1")  # a GPU with no field at all still counts
        for field in _FIELDS:
            if field in gpu:
                lines.append(f"{prefix}{field}={gpu[field]}")
            elif field == "power_min_mw":
                lines.append(f"{prefix}{field}={_DEFAULT_MIN_MW}")
            elif field == "power_max_mw":
                lines.append(f"{prefix}{field}={_DEFAULT_MAX_MW}")
        if "processes" in gpu:  # [(pid, used bytes)]
            lines.append(prefix + "processes=" + ",".join(f"{p}:{m}" for p, m in gpu["processes"]))
        elif "pids" in gpu:
            lines.append(prefix + "processes=" + ",".join(f"{p}:{2**30}" for p in gpu["pids"]))
        if gpu.get("mig"):  # the UUIDs of its MIG devices, in slot order
            lines.append(prefix + "mig=" + ",".join(gpu["mig"]))
        if gpu.get("lost"):
            lines.append(f"{prefix}lost=1")
        for function, failure in (gpu.get("errors") or {}).items():
            if failure:
                lines.append(f"{prefix}error.{function}={failure}")
    for line in lines:
        assert "\n" not in line and line.count("=") >= 1, line
    return lines


class CNvmlState:
    """The C fake's state file, and what the library wrote back into it."""

    def __init__(self, path: Path, log_calls: bool = True):
        self.folder = build()
        self.path = path
        #: whether the library logs every call (tests count calls; a benchmark measures
        #: the binding as a driver serves it, and a driver keeps no such log)
        self.log_calls = log_calls
        #: every call the library answered, one name a line (pynvml's function names)
        self.log_path = path.with_name(path.name + ".calls")

    def write(self, state: dict[str, Any]) -> None:
        """Replaces the state, keeping the power limits the library set."""
        kept = [f"gpu.{gpu}.power_limit_set_mw={mw}" for gpu, mw in self.limits().items()]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("\n".join([*to_lines(state), *kept]) + "\n")
        tmp.replace(self.path)

    def limits(self) -> dict[int, int]:
        """GPU index -> the power limit (mW) set through nvmlDeviceSetPowerManagementLimit."""
        found: dict[int, int] = {}
        if not self.path.exists():
            return found
        for line in self.path.read_text().splitlines():
            key, _, value = line.partition("=")
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "gpu" and parts[2] == "power_limit_set_mw":
                found[int(parts[1])] = int(value)
        return found

    def calls(self) -> list[str]:
        return self.log_path.read_text().split() if self.log_path.exists() else []

    def env(self) -> dict[str, str]:
        """For a daemon: the real pynvml finds this library first."""
        library_path = os.environ.get("LD_LIBRARY_PATH")
        env = {
            "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(self.folder), library_path])),
            "FAKE_NVML_STATE": str(self.path),
        }
        if self.log_calls:
            env["FAKE_NVML_LOG"] = str(self.log_path)
        return env

    @contextlib.contextmanager
    def loaded_into_pynvml(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[ctypes.CDLL]:
        """The real pynvml in this process, talking to this library (a process reads
        LD_LIBRARY_PATH once, when it starts: the library is handed to pynvml by path)."""
        library = ctypes.CDLL(str(self.folder / LIBRARY))
        library.fake_nvml_reset()
        monkeypatch.setenv("FAKE_NVML_STATE", str(self.path))
        monkeypatch.setenv("FAKE_NVML_LOG", str(self.log_path))
        monkeypatch.delenv("GOVERNOR_NVML_MODULE", raising=False)
        monkeypatch.setattr(pynvml, "nvmlLib", library)
        monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})
        try:
            yield library
        finally:
            library.fake_nvml_reset()
