"""The one small interface every sampler implements, as node_exporter's collectors do.

A sampler reads its hardware and returns readings. It says "this hardware is not here"
by raising `SamplerUnavailable` (no series, not a failure) and fails by raising anything
else; the runner times it and turns either into its `SamplerHealth`, so no sampler can
take the round down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from governor.snapshot import Reading


class SamplerUnavailable(Exception):
    """The source this sampler reads is not on this machine (no GPU, no hwmon...)."""


@dataclass
class SampleResult:
    readings: list[Reading] = field(default_factory=list)
    #: faults that did not fail the round: a lost GPU, a sensor that could not be read
    problems: list[str] = field(default_factory=list)
    #: GPU index -> pids of its compute processes (NVML only)
    gpu_pids: dict[str, frozenset[int]] = field(default_factory=dict)


class Sampler(Protocol):
    #: the `sampler` label of governor_sampler_up
    name: str

    def sample(self) -> SampleResult:
        """Read the hardware once. Raise SamplerUnavailable if it is not there."""
        ...

    def close(self) -> None:
        """Release what the sampler holds (NVML handles, files)."""
        ...
