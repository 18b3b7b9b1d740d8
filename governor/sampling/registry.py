"""Which samplers a config asks for, built in one place."""

from __future__ import annotations

import logging

from governor.config import SourcesConfig
from governor.sampling.accel import AccelSampler
from governor.sampling.amdgpu import AmdgpuSampler
from governor.sampling.base import Sampler
from governor.sampling.cpu import CpuSampler
from governor.sampling.hwmon import HwmonSampler
from governor.sampling.nvml import NvmlSampler
from governor.sampling.paths import SysPaths
from governor.sampling.simulated import JobProcesses, build_simulated

log = logging.getLogger(__name__)


def build_samplers(sources: SourcesConfig, jobs: JobProcesses | None = None) -> list[Sampler]:
    """The samplers for these sources. Raises NvmlUnavailableError for nvml = "required".

    `jobs` lists the registered jobs' processes and devices: the simulated GPUs
    (`sources.simulate`) are as busy as the jobs bound to them."""
    paths = SysPaths(sources.sysfs_root, sources.procfs_root)
    samplers: list[Sampler] = [CpuSampler(paths), HwmonSampler(paths)]
    if sources.nvml == "off":
        log.info('nvml: off (sources.nvml = "off")')
    else:
        samplers.append(NvmlSampler(required=sources.nvml == "required"))
    samplers += [AmdgpuSampler(paths), AccelSampler(paths)]
    if sources.simulate:
        samplers.append(build_simulated(sources.simulate, paths, jobs))
        log.warning("simulated GPUs from %s (sources.simulate): their readings are made up",
                    sources.simulate)
    return samplers
