"""GPU power caps through NVML, for `power_cap` rules.

The original limit is read and written to the journal before the first cap, and put back
when the rule clears or no job is bound to the GPU any more, or by `governor release-all`
if the daemon dies: a lowered limit otherwise stays until reboot. Setting a limit needs
root; without root or NVML the rules are reported as not enforceable, not ignored.

Journal entries: {"kind": "power_cap", "gpu": "0", "uuid": "GPU-...", "original_mw": N,
"cap_mw": N}.

The demo's simulated GPUs (`sources.simulate`) are capped the same way: the daemon hands
PowerCapper the simulated sampler's stand-in for NVML (SimulatedSampler.nvml), which needs
no root. A simulated limit lives in the daemon that set it, so a journal entry for a
"SIM-..." GPU is released without a call.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from governor.host.nvml import load_module
from governor.policy.directives import PowerCap
from governor.safety.journal import Journal

log = logging.getLogger(__name__)


def hold_key(gpu: str) -> str:
    return f"power_cap:{gpu}"


class PowerCapper:
    def __init__(
        self,
        journal: Journal,
        *,
        #: the pynvml module, or anything with its power-limit functions (the simulated
        #: GPUs' stand-in, SimulatedSampler.nvml); None loads pynvml
        nvml: Any = None,
        is_root: Callable[[], bool] = lambda: os.geteuid() == 0,
    ):
        self._journal = journal
        self._nvml: Any = None
        #: why caps cannot be set here; None when they can
        self.unavailable: str | None = None
        #: gpu index -> the entry in the journal for it
        self._capped: dict[str, dict[str, Any]] = {}
        if not is_root():
            self.unavailable = "setting a GPU power limit needs root"
            return
        try:
            module = nvml if nvml is not None else load_module()
            module.nvmlInit()
        except Exception as exc:  # NVMLError, ImportError: either way no caps
            self.unavailable = f"NVML is not available: {exc}"
            return
        self._nvml = module

    @property
    def capped(self) -> dict[str, float]:
        """GPU index -> the cap in watts now in force."""
        return {gpu: entry["cap_mw"] / 1000.0 for gpu, entry in self._capped.items()}

    def limit_range(self, gpu: str) -> tuple[float, float] | None:
        """(the driver's lowest limit, the limit before governor set one), in W, for a
        hold rule's `via = "power_limit"`; None when it cannot be read (or caps cannot be
        set here). The original is the journal's while the GPU is capped, else the limit
        in force now."""
        if self._nvml is None:
            return None
        try:
            handle = self._nvml.nvmlDeviceGetHandleByIndex(int(gpu))
            low, _ = self._nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
            entry = self._capped.get(gpu)
            original = (entry["original_mw"] if entry is not None
                        else self._nvml.nvmlDeviceGetPowerManagementLimit(handle))
        except (self._nvml.NVMLError, ValueError) as exc:
            log.debug("gpu %s: cannot read the power limit's range: %s", gpu, exc)
            return None
        return min(float(low), float(original)) / 1000.0, float(original) / 1000.0

    def apply(self, caps: Mapping[str, PowerCap]) -> list[tuple[str, str, PowerCap | None]]:
        """Cap the GPUs in `caps`, restore the others. Returns what changed:
        ("power_cap" | "restore", gpu, cap)."""
        changed: list[tuple[str, str, PowerCap | None]] = []
        if self._nvml is None:
            return changed
        by_gpu = {cap.gpu: cap for cap in caps.values()}
        for gpu, cap in by_gpu.items():
            try:
                if self._cap(gpu, cap):
                    changed.append(("power_cap", gpu, cap))
            except self._nvml.NVMLError as exc:
                log.warning("gpu %s: cannot cap power at %g W: %s", gpu, cap.watts, exc)
        for gpu in list(self._capped):
            if gpu not in by_gpu and self._restore(gpu):
                changed.append(("restore", gpu, None))
        return changed

    def _cap(self, gpu: str, cap: PowerCap) -> bool:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(int(gpu))
        entry = self._capped.get(gpu)
        if entry is None:
            original = int(nvml.nvmlDeviceGetPowerManagementLimit(handle))
            uuid = nvml.nvmlDeviceGetUUID(handle)
            entry = {"kind": "power_cap", "gpu": gpu,
                     "uuid": uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                     "original_mw": original, "cap_mw": original}
        low, high = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        cap_mw = int(min(max(cap.watts * 1000, low), high, entry["original_mw"]))
        if cap_mw == entry["cap_mw"] and gpu in self._capped:
            return False
        entry = {**entry, "cap_mw": cap_mw}
        self._journal.put_hold(hold_key(gpu), entry)  # before the limit changes
        nvml.nvmlDeviceSetPowerManagementLimit(handle, cap_mw)
        self._capped[gpu] = entry
        log.info("gpu %s: power limit %g W -> %g W (%s)", gpu, entry["original_mw"] / 1000,
                 cap_mw / 1000, "; ".join(cap.reasons))
        return True

    def _restore(self, gpu: str) -> bool:
        entry = self._capped[gpu]
        try:
            handle = self._nvml.nvmlDeviceGetHandleByIndex(int(gpu))
            self._nvml.nvmlDeviceSetPowerManagementLimit(handle, entry["original_mw"])
        except self._nvml.NVMLError as exc:
            log.warning("gpu %s: cannot restore the power limit to %g W: %s (the journal keeps "
                        "it for release-all)", gpu, entry["original_mw"] / 1000, exc)
            return False
        del self._capped[gpu]
        self._journal.drop_hold(hold_key(gpu))
        log.info("gpu %s: power limit restored to %g W", gpu, entry["original_mw"] / 1000)
        return True

    def release_all(self) -> None:
        for gpu in list(self._capped):
            self._restore(gpu)

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
            self._nvml = None


def undo(entry: dict[str, Any], nvml: ModuleType | None = None) -> str:
    """Put a GPU's original power limit back, from a journal entry alone."""
    return undo_checked(entry, nvml)[1]


def undo_checked(entry: dict[str, Any], nvml: ModuleType | None = None) -> tuple[bool, str]:
    """As undo, and whether the limit was restored (else release-all keeps the hold)."""
    gpu = entry.get("gpu")
    if str(entry.get("uuid", "")).startswith("SIM-"):
        return True, f"gpu {gpu}: simulated, its power limit went with the daemon that set it"
    try:
        module: Any = nvml if nvml is not None else load_module()
        module.nvmlInit()
    except Exception as exc:
        return False, f"gpu {gpu}: cannot restore the power limit: NVML is not available: {exc}"
    try:
        try:
            handle = module.nvmlDeviceGetHandleByUUID(entry["uuid"])
        except module.NVMLError:
            handle = module.nvmlDeviceGetHandleByIndex(int(str(gpu)))
        module.nvmlDeviceSetPowerManagementLimit(handle, int(entry["original_mw"]))
        return True, f"gpu {gpu}: power limit restored to {int(entry['original_mw']) / 1000:g} W"
    except (module.NVMLError, KeyError, ValueError) as exc:
        return False, f"gpu {gpu}: cannot restore the power limit: {exc}"
    finally:
        with contextlib.suppress(module.NVMLError):
            module.nvmlShutdown()
