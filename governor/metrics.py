"""The Prometheus exposition, built from the last snapshot at each scrape.

As client_python's custom collectors: readings become fresh metric families on every
scrape, so a GPU that vanished leaves no stale series, and a scrape does no hardware
I/O. The daemon's own counters are ordinary Counter/Gauge objects in the same private
registry.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from governor import __version__
from governor.catalog import PREFIX, SAMPLED
from governor.snapshot import SamplerState, SnapshotStore

# `_created` series double every counter for no use here.
disable_created_metrics()  # type: ignore[no-untyped-call]


class SnapshotCollector(Collector):
    def __init__(self, store: SnapshotStore):
        self._store = store

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            PREFIX + "build_info", "governor's version; value 1.", labels=["version"]
        )
        build.add_metric([__version__], 1)
        yield build

        snapshot = self._store.latest
        if snapshot is None:
            return
        families: dict[str, GaugeMetricFamily] = {}
        for r in snapshot.readings:
            family = families.get(r.metric)
            if family is None:
                spec = SAMPLED[r.metric]
                family = GaugeMetricFamily(PREFIX + r.metric, spec.help, labels=list(spec.labels))
                families[r.metric] = family
            family.add_metric([value for _, value in r.labels], r.value)
        for name in SAMPLED:  # catalog order, so the exposition is stable
            if name in families:
                yield families[name]

        up = GaugeMetricFamily(
            PREFIX + "sampler_up",
            "1 when the sampler's last round succeeded, 0 when it failed. "
            "Samplers whose hardware is absent have no series.",
            labels=["sampler"],
        )
        duration = GaugeMetricFamily(
            PREFIX + "sample_duration_seconds",
            "How long the sampler's last round took.",
            labels=["sampler"],
        )
        for health in snapshot.samplers:
            if health.state is SamplerState.UNAVAILABLE:
                continue
            up.add_metric([health.name], 1 if health.state is SamplerState.OK else 0)
            duration.add_metric([health.name], health.duration_seconds)
        yield up
        yield duration


class DaemonMetrics:
    """The private registry, with the daemon's own counters beside the snapshot collector."""

    def __init__(self, store: SnapshotStore):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(store))
        self.rounds = Counter(
            "governor_rounds", "Sampling rounds completed.", registry=self.registry
        )
        self.rounds_overrun = Counter(
            "governor_rounds_overrun",
            "Rounds that took longer than the interval; the rounds they overlapped were "
            "skipped, not stacked.",
            registry=self.registry,
        )
        self.round_duration = Gauge(
            "governor_round_duration_seconds",
            "How long the last sampling round took, all samplers together.",
            registry=self.registry,
        )
        self.sampler_errors = Counter(
            "governor_sampler_errors",
            "Rounds in which the sampler failed.",
            ["sampler"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
