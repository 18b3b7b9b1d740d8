"""The Prometheus exposition, built from the last snapshot at each scrape.

As client_python's custom collectors: readings become fresh metric families on every
scrape, so a GPU that vanished leaves no stale series, and a scrape does no hardware
I/O. The daemon's own counters are ordinary Counter/Gauge objects in the same private
registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

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

if TYPE_CHECKING:
    from governor.control import Controller

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


class ControlCollector(Collector):
    """Rule states, job speeds and power caps, from the controller's published view."""

    STATES: ClassVar[dict[str, int]] = {"ok": 0, "pending": 1, "tripped": 2}

    def __init__(self, controller: Controller):
        self._controller = controller

    def collect(self) -> Iterator[Metric]:
        view = self._controller.view
        rules = GaugeMetricFamily(
            PREFIX + "rule_state", "State of each series a rule watches: 0 ok, 1 pending, "
            "2 tripped (clearing counts as tripped).", labels=["rule", "series"])
        for entry in view.rules:
            if entry["series"] is not None:
                rules.add_metric([str(entry["name"]), str(entry["series"])],
                                 self.STATES[str(entry["state"])])
        yield rules
        speed = GaugeMetricFamily(
            PREFIX + "job_speed_ratio", "Share of normal speed each job keeps: 1 running, "
            "0 paused, else the slow speed.", labels=["job", "id"])
        paused = GaugeMetricFamily(PREFIX + "job_paused", "1 while the job is paused.",
                                   labels=["job", "id"])
        for job in view.jobs:
            if job["state"] == "gone":
                continue
            speed.add_metric([job["name"], job["id"]], job["speed"])
            paused.add_metric([job["name"], job["id"]], 1 if job["state"] == "paused" else 0)
        yield speed
        yield paused
        caps = GaugeMetricFamily(PREFIX + "gpu_power_cap_watts",
                                 "Power limit governor has set on the GPU while a power_cap "
                                 "rule holds it.", labels=["gpu"])
        for gpu, watts in sorted(self._controller.power_caps.items()):
            caps.add_metric([gpu], watts)
        yield caps


class DaemonMetrics:
    """The private registry, with the daemon's own counters beside the snapshot collector."""

    def __init__(self, store: SnapshotStore):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(store))
        self.actions = Counter(
            "governor_actions", "Actions taken: pause, resume, slow, power_cap, restore; "
            "rule is the rule's name, or operator.", ["action", "rule"],
            registry=self.registry,
        )
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
        self.audit_errors = Counter(
            "governor_audit_errors",
            "Audit events that could not be written (a full disk, an I/O error); the "
            "actions they record went on.",
            registry=self.registry,
        )

    def watch(self, controller: Controller) -> None:
        self.registry.register(ControlCollector(controller))

    def count_action(self, action: str, rule: str) -> None:
        self.actions.labels(action, rule).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
