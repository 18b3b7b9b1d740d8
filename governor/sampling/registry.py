"""Every sampler, in one table, as governor/actuators/modes.py lists the modes.

A sampler is its module (`governor/sampling/<source>.py`: the class, a `from_context`
building it, and the `METRICS` it produces) and one `SamplerSpec` here: its name, its
build path, the `[sources]` key that turns it off if any, and where its metrics are
declared. `build_samplers` builds the table's samplers in its order (that order is the
order of their health in the snapshot and the exposition), and the catalog
(`governor.catalog.SAMPLED`) is assembled from the metrics it names, so the metrics are
valid in rules and exported as soon as the sampler is listed here.

The table names its code by dotted path and imports it only when used, as MODES does, so
that importing this module (the catalog does, on first use) builds nothing and loads no
NVML.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from governor.sampling.paths import SysPaths

if TYPE_CHECKING:
    from collections.abc import Callable

    from governor.catalog import MetricSpec
    from governor.config import SourcesConfig
    from governor.sampling.base import Sampler
    from governor.sampling.simulated import JobProcesses

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class SamplerContext:
    """What a sampler may be built with."""

    sources: SourcesConfig
    #: where sysfs and procfs are (`sources.sysfs_root`, `sources.procfs_root`): tests
    #: point the samplers at a fixture tree
    paths: SysPaths
    #: the registered jobs' processes and devices (the simulated GPUs are as busy as the
    #: jobs bound to them); None outside the daemon
    jobs: JobProcesses | None


@dataclass(frozen=True, slots=True)
class SamplerSpec:
    #: the sampler's `name` (the `sampler` label of governor_sampler_up)
    name: str
    #: "module:function" building the sampler from a SamplerContext
    build: str
    #: "module:NAME" of the tuple of MetricSpecs it produces; a sampler that produces
    #: another's metrics names that declaration (the catalog lists each metric once)
    metrics: str
    #: the `[sources]` key that can leave it out; None: always built. Its other values
    #: are the sampler's to read in `from_context` ("required" for nvml)
    switch: str | None = None
    #: the switch's value that leaves it out: "off" is said aloud, so it is logged; ""
    #: is a key left unset, which is not
    off: str = "off"
    #: logged as a warning, with the switch's value, whenever it is built: a source whose
    #: readings must not be taken for the hardware's
    warning: str | None = None

    def sampler(self, context: SamplerContext) -> Sampler:
        factory: Callable[[SamplerContext], Sampler] = resolve(self.build)
        return factory(context)

    def declared(self) -> tuple[MetricSpec, ...]:
        specs: tuple[MetricSpec, ...] = resolve(self.metrics)
        return specs


def resolve(path: str) -> Any:
    """The object a "module:name" path names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("cpu", "governor.sampling.cpu:from_context", "governor.sampling.cpu:METRICS"),
    SamplerSpec("hwmon", "governor.sampling.hwmon:from_context",
                "governor.sampling.hwmon:METRICS"),
    SamplerSpec("nvml", "governor.sampling.nvml:from_context", "governor.sampling.nvml:METRICS",
                switch="nvml"),
    SamplerSpec("amdgpu", "governor.sampling.amdgpu:from_context",
                "governor.sampling.amdgpu:METRICS"),
    SamplerSpec("accel", "governor.sampling.accel:from_context",
                "governor.sampling.accel:METRICS"),
    SamplerSpec("simulated", "governor.sampling.simulated:from_context",
                "governor.sampling.nvml:METRICS", switch="simulate", off="",
                warning="simulated GPUs from %s (sources.simulate): their readings are made up"),
)


def declared_metrics() -> tuple[MetricSpec, ...]:
    """Every metric the table's samplers declare, each once, in the table's order (the
    order the catalog exports them in). Raises ValueError when two declarations give one
    name different specs: a rule or a panel could not tell which one it is reading."""
    seen: dict[str, MetricSpec] = {}
    for sampler in SAMPLERS:
        for spec in sampler.declared():
            known = seen.setdefault(spec.name, spec)
            if known != spec:
                raise ValueError(f"{sampler.name} declares {spec.name} unlike another sampler")
    return tuple(seen.values())


def build_samplers(sources: SourcesConfig, jobs: JobProcesses | None = None) -> list[Sampler]:
    """The samplers for these sources. Raises NvmlUnavailableError for nvml = "required".

    `jobs` lists the registered jobs' processes and devices: the simulated GPUs
    (`sources.simulate`) are as busy as the jobs bound to them."""
    context = SamplerContext(sources, SysPaths(sources.sysfs_root, sources.procfs_root), jobs)
    samplers: list[Sampler] = []
    for spec in SAMPLERS:
        value = getattr(sources, spec.switch) if spec.switch is not None else None
        if spec.switch is not None and value == spec.off:
            if spec.off:
                log.info('%s: off (sources.%s = "%s")', spec.name, spec.switch, spec.off)
            continue
        samplers.append(spec.sampler(context))
        if spec.warning is not None:
            log.warning(spec.warning, value)
    return samplers
