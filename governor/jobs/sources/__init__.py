"""Where jobs come from, in one table.

Every job carries its source (CONTRACT section 7). "api" and "launch" jobs arrive
through the REST API (`POST /v1/jobs`: `governor register`, the cooperative client,
`governor launch`); the sources listed in `SOURCES` are polled by the daemon once a
round instead (see base.py). A new scheduler is its module here, with a `from_config`,
and one line in `SOURCES`; its `[section]` in governor/config.py turns it on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from governor.actuators.modes import resolve

if TYPE_CHECKING:
    from governor.config import Config
    from governor.jobs.sources.base import JobSource


@dataclass(frozen=True, slots=True)
class SourceSpec:
    name: str
    #: "module:function" building the source from the Config
    build: str
    #: the config switch that turns discovery on, as "section.key" (a bool)
    enabled_by: str
    summary: str

    def enabled(self, config: Config) -> bool:
        section, _, key = self.enabled_by.partition(".")
        return bool(getattr(getattr(config, section), key))


SOURCES: dict[str, SourceSpec] = {spec.name: spec for spec in (
    SourceSpec("slurm", "governor.jobs.sources.slurm:from_config", "slurm.discover",
               "every Slurm job with processes on this node (slurmd's spool)"),
    SourceSpec("kubernetes", "governor.jobs.sources.kubernetes:from_config",
               "kubernetes.discover",
               "every pod on this node holding a GPU (the kubelet's pod-resources API)"),
)}

#: sources whose jobs arrive through the REST API
PUSHED: tuple[str, ...] = ("api", "launch")
#: every value a job's "source" may have
SOURCE_NAMES: tuple[str, ...] = (*PUSHED, *SOURCES)

if TYPE_CHECKING:
    SourceName = str
else:
    SourceName = Literal[SOURCE_NAMES]


def build_sources(config: Config) -> list[JobSource]:
    """The polled sources the config turns on."""
    return [resolve(spec.build)(config) for spec in SOURCES.values() if spec.enabled(config)]
