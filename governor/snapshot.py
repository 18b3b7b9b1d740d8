"""The immutable result of one sampling round, which everything downstream reads.

Nothing after the samplers touches hardware: the policy, the metrics endpoint and the
API all read the latest `Snapshot`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from governor.catalog import SAMPLED

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Reading:
    """One series' value: a metric name from the catalog, its labels, in catalog order."""

    metric: str
    labels: Labels
    value: float

    def label(self, key: str) -> str | None:
        for name, value in self.labels:
            if name == key:
                return value
        return None

    def series(self) -> str:
        """The series as PromQL would write it: `gpu_temperature_celsius{gpu="0"}`."""
        inner = ",".join(f'{k}="{v}"' for k, v in self.labels)
        return f"{self.metric}{{{inner}}}" if inner else self.metric

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "labels": dict(self.labels), "value": self.value}


#: metric -> its labels in catalog order, and as a set (a sampler makes ~200 readings a
#: round: checked against a set made once, not two made per reading). Filled on first
#: use of each metric, not at import: the catalog is assembled from the sampler modules,
#: and they import this one.
_LABELS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {}


def reading(metric: str, value: float, **labels: str) -> Reading:
    """A reading whose labels are checked against the catalog and put in its order."""
    entry = _LABELS.get(metric)
    if entry is None:
        spec = SAMPLED[metric]  # KeyError for a metric the catalog does not know, as before
        entry = _LABELS[metric] = (spec.labels, frozenset(spec.labels))
    names, allowed = entry
    if labels.keys() != allowed:
        raise ValueError(f"{metric} takes labels {names}, got {sorted(labels)}")
    return Reading(metric, tuple([(name, labels[name]) for name in names]), float(value))


class SamplerState(StrEnum):
    OK = "ok"
    #: the sampler failed this round (governor_sampler_up 0)
    ERROR = "error"
    #: the hardware it reads is not on this machine; no series, not a failure
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class SamplerHealth:
    name: str
    state: SamplerState
    duration_seconds: float
    #: why it failed or is unavailable
    error: str | None = None
    #: faults that did not fail the round (a lost GPU, an unreadable sensor)
    problems: tuple[str, ...] = ()
    #: wall-clock time of the last round that succeeded, if any
    last_success: float | None = None
    #: calls in a row that raised (0 after a success); the sampler backs off meanwhile
    failures: int = 0
    #: wall-clock time of the round that tries a failing sampler again
    retry_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "up": self.state is SamplerState.OK,
            "duration_seconds": self.duration_seconds,
            "error": self.error,
            "problems": list(self.problems),
            "last_success": self.last_success,
            "consecutive_failures": self.failures,
            "retry_at": self.retry_at,
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    sequence: int
    #: wall-clock time (time.time()) when the round started
    taken_at: float
    #: monotonic time when the round started; what the policy measures durations with
    monotonic: float
    readings: tuple[Reading, ...]
    samplers: tuple[SamplerHealth, ...]
    #: GPU index ("0", "1", ...) -> pids of its compute processes, from NVML
    gpu_pids: Mapping[str, frozenset[int]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def of(self, metric: str) -> Iterable[Reading]:
        return (r for r in self.readings if r.metric == metric)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "taken_at": self.taken_at,
            "samplers": [s.as_dict() for s in self.samplers],
            "readings": [r.as_dict() for r in self.readings],
            "gpu_pids": {gpu: sorted(pids) for gpu, pids in self.gpu_pids.items()},
        }


class SnapshotStore:
    """Holds the latest snapshot; the sampling loop publishes, everyone else reads."""

    def __init__(self) -> None:
        self._latest: Snapshot | None = None
        self._changed = threading.Condition()

    @property
    def latest(self) -> Snapshot | None:
        return self._latest

    def publish(self, snapshot: Snapshot) -> None:
        with self._changed:
            self._latest = snapshot
            self._changed.notify_all()

    def wait_for(self, sequence: int, timeout: float) -> Snapshot | None:
        """Block until a snapshot with at least this sequence number is published."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._latest is not None and self._latest.sequence >= sequence,
                timeout,
            )
            return self._latest
