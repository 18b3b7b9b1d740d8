"""The Prometheus exposition, built from the last snapshot at each scrape.

As client_python's custom collectors: readings become fresh metric families from the
last snapshot, so a GPU that vanished leaves no stale series, and a scrape does no
hardware I/O. The daemon's own counters are Counter/Gauge objects in the same private
registry. The rendered bytes are cached until the snapshot, the controller's view or one
of the daemon's own counters changes: many scrapers between two rounds then cost one
render, and a scrape under load stays cheap.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from governor import __version__
from governor.catalog import PREFIX, SAMPLED
from governor.client.progress import STEP_BUCKETS, bucket_label
from governor.policy.directives import OPERATOR
from governor.snapshot import SamplerState, SnapshotStore

if TYPE_CHECKING:
    from governor.config import RuleConfig
    from governor.control.controller import Controller

# `_created` series double every counter for no use here.
disable_created_metrics()  # type: ignore[no-untyped-call]


class _Changes:
    """A token that every change to a daemon counter or gauge replaces, so the cached
    exposition can tell that it is stale without rendering. Tokens are never reused, so
    two changes racing on threads still leave a token that no cache holds."""

    def __init__(self) -> None:
        self._tokens = itertools.count(1)
        self.token = 0

    def bump(self) -> None:
        self.token = next(self._tokens)


_CHANGES = _Changes()


class TrackedCounter(Counter):
    """A Counter whose increments invalidate the cached exposition (its labelled children
    are TrackedCounters too)."""

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        super().inc(amount, exemplar)
        _CHANGES.bump()


class TrackedGauge(Gauge):
    """A Gauge whose changes invalidate the cached exposition."""

    def inc(self, amount: float = 1) -> None:
        super().inc(amount)
        _CHANGES.bump()

    def dec(self, amount: float = 1) -> None:
        super().dec(amount)
        _CHANGES.bump()

    def set(self, value: float) -> None:
        super().set(value)
        _CHANGES.bump()


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


def pod_of(source: str, scheduler_id: str | None) -> tuple[str, str]:
    """A Kubernetes job's (namespace, pod), from its scheduler id; ("", "") for others."""
    if source != "kubernetes" or not scheduler_id or "/" not in scheduler_id:
        return "", ""
    namespace, _, pod = scheduler_id.partition("/")
    return namespace, pod


def threshold_unit(metric: str) -> str:
    """The unit family a rule's threshold belongs to: the suffix of the metric it watches,
    so a panel draws `_celsius` lines on a `_celsius` axis. `gpu_info` is a presence flag
    (1 while the GPU is there), which `_active` already stands for: an `_info` series must
    be 1, and a threshold is not."""
    unit = metric.rsplit("_", 1)[-1]
    return "active" if unit == "info" else unit


#: every threshold family, in catalog order, so the exposition's families are stable
THRESHOLD_UNITS = tuple(dict.fromkeys(threshold_unit(name) for name in SAMPLED))


class ControlCollector(Collector):
    """Rule states and thresholds, job states, speeds and power caps, from the
    controller's published view."""

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
        yield from self._thresholds(view.rules)
        yield from self._holds(view.rules)
        speed = GaugeMetricFamily(
            PREFIX + "job_speed_ratio", "Share of normal speed each job keeps: 1 running, "
            "0 paused, else the slow speed.", labels=["job", "id"])
        paused = GaugeMetricFamily(PREFIX + "job_paused", "1 while the job is paused.",
                                   labels=["job", "id"])
        outside = GaugeMetricFamily(
            PREFIX + "job_outside_resumed", "1 while someone outside governor (an "
            "administrator's scontrol resume) lets the job run during a pause governor then "
            "stands aside from, until the pause ends; its state is then running.",
            labels=["job", "id"])
        states = GaugeMetricFamily(
            PREFIX + "job_state_info", "Each job's state (running, slowed, paused) and what "
            "holds it: the rules, joined by \", \", or operator; \"\" while running. Value 1.",
            labels=["job", "id", "state", "reason"])
        info = GaugeMetricFamily(
            PREFIX + "job_info", "Each job's origin, value 1: source (api, launch, slurm, "
            "kubernetes), the scheduler's id for it (the Slurm job id, namespace/pod), its "
            "user, and a pod's namespace and name (\"\" for other jobs), to join any per-job "
            "series to the scheduler's job.", labels=["id", "job", "source", "scheduler_id",
                                                      "user", "namespace", "pod"])
        pods = GaugeMetricFamily(
            PREFIX + "gpu_pod_info", "Value 1 for each GPU a Kubernetes pod holds, to join "
            "the per-GPU series to the pod on the GPU.", labels=["gpu", "namespace", "pod"])
        for job in view.jobs:
            if job.state == "gone":
                continue
            speed.add_metric([job.name, job.id], job.speed)
            paused.add_metric([job.name, job.id], 1 if job.state == "paused" else 0)
            outside.add_metric([job.name, job.id], 1 if job.outside == "resumed" else 0)
            holding = "" if job.state == "running" else ", ".join(
                view.held_by.get(job.id, ()))
            states.add_metric([job.name, job.id, job.state, holding], 1)
            namespace, pod = pod_of(job.source, job.scheduler_id)
            info.add_metric([job.id, job.name, job.source, job.scheduler_id or "",
                             job.user or "", namespace, pod], 1)
            if pod:
                for device in job.devices:
                    if device.startswith("gpu") and device[3:].isdigit():
                        pods.add_metric([device[3:], namespace, pod], 1)
        yield info
        yield speed
        yield paused
        yield outside
        yield states
        caps = GaugeMetricFamily(PREFIX + "gpu_power_cap_watts",
                                 "Power limit governor has set on the GPU while a power_cap "
                                 "rule holds it.", labels=["gpu"])
        for gpu, watts in sorted(self._controller.power_caps.items()):
            caps.add_metric([gpu], watts)
        yield caps
        yield pods

    @staticmethod
    def _thresholds(entries: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
        """One series per rule and line (trip, clear), whatever series the rule watches,
        so a dashboard can draw the lines before any reading crosses them."""
        families = {
            unit: GaugeMetricFamily(
                f"{PREFIX}rule_threshold_{unit}",
                f"Trip and clear lines of the rules on *_{unit} metrics, in the metric's "
                "unit: line=\"trip\" trips the rule, line=\"clear\" clears it.",
                labels=["rule", "metric", "line"])
            for unit in THRESHOLD_UNITS
        }
        seen: set[str] = set()
        for entry in entries:
            name, metric = str(entry["name"]), str(entry["metric"])
            if name in seen or entry["threshold"] is None:  # a hold rule has no lines
                continue
            seen.add(name)
            family = families[threshold_unit(metric)]
            family.add_metric([name, metric, "trip"], float(entry["threshold"]))
            family.add_metric([name, metric, "clear"], float(entry["clear_threshold"]))
        yield from families.values()

    @staticmethod
    def _holds(entries: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
        """The hold rules (CONTRACT section 8): the speed each series' loop asks for, and
        each rule's target in its metric's unit (a family per unit in use, named as the
        threshold families are)."""
        output = GaugeMetricFamily(
            PREFIX + "rule_output_ratio", "The speed the loop of a hold rule asks for, per "
            "series it holds: 1 while it does not hold back, 0 a pause.",
            labels=["rule", "series"])
        targets: dict[str, GaugeMetricFamily] = {}
        seen: set[str] = set()
        for entry in entries:
            if entry.get("target") is None:
                continue
            name, metric = str(entry["name"]), str(entry["metric"])
            if entry["series"] is not None:
                ratio = entry.get("output")
                output.add_metric([name, str(entry["series"])],
                                  1.0 if ratio is None else float(ratio))
            if name in seen:
                continue
            seen.add(name)
            unit = threshold_unit(metric)
            family = targets.get(unit)
            if family is None:
                family = targets[unit] = GaugeMetricFamily(
                    f"{PREFIX}rule_target_{unit}",
                    f"The value the hold rules on *_{unit} metrics hold each series at, in "
                    "the metric's unit.", labels=["rule", "metric"])
            family.add_metric([name, metric], float(entry["target"]))
        yield output
        for unit in THRESHOLD_UNITS:
            if unit in targets:
                yield targets[unit]


class DaemonMetrics:
    """The private registry, with the daemon's own counters beside the snapshot collector.

    `render` caches: everything in the registry must be covered by its key (the snapshot,
    the controller's view and power caps, and the token that TrackedCounter and
    TrackedGauge move on), so a new counter of the daemon's own must be one of those.
    """

    def __init__(self, store: SnapshotStore):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(store))
        self._store = store
        self._controller: Controller | None = None
        self._render_lock = threading.Lock()
        self._cached: tuple[tuple[Any, ...], bytes] | None = None
        self.actions = TrackedCounter(
            "governor_actions", "Actions taken: pause, resume, slow, power_cap, restore; "
            "rule is the rule's name, or operator.", ["action", "rule"],
            registry=self.registry,
        )
        self.rounds = TrackedCounter(
            "governor_rounds", "Sampling rounds completed.", registry=self.registry
        )
        self.rounds_overrun = TrackedCounter(
            "governor_rounds_overrun",
            "Rounds that took longer than the interval; the rounds they overlapped were "
            "skipped, not stacked.",
            registry=self.registry,
        )
        self.round_duration = TrackedGauge(
            "governor_round_duration_seconds",
            "How long the last sampling round took, all samplers together.",
            registry=self.registry,
        )
        self.sampler_errors = TrackedCounter(
            "governor_sampler_errors",
            "Rounds in which the sampler failed, including rounds it sat out while backing "
            "off or stuck in a read.",
            ["sampler"],
            registry=self.registry,
        )
        self.audit_errors = TrackedCounter(
            "governor_audit_errors",
            "Audit events that could not be written (a full disk, an I/O error); the "
            "actions they record went on.",
            registry=self.registry,
        )
        self.sampler_problems = TrackedCounter(
            "governor_sampler_problems",
            "Faults that did not fail the sampler's round (a sensor that vanished or read "
            "garbage, a lost GPU, a field NVML could not read), one per fault per round.",
            ["sampler"],
            registry=self.registry,
        )
        self.round_lateness = TrackedGauge(
            "governor_round_lateness_seconds",
            "How late the last sampling round started against its tick on the interval "
            "grid.",
            registry=self.registry,
        )
        self.rounds_late = TrackedCounter(
            "governor_rounds_late",
            "Rounds that started more than half an interval late (the daemon starved of "
            "CPU); overruns are counted apart.",
            registry=self.registry,
        )
        self.outside_resumes = TrackedCounter(
            "governor_outside_resumes",
            "Jobs governor held that someone else resumed (an administrator's scontrol "
            "resume); governor let them run until the hold's rule cleared.",
            ["source"],
            registry=self.registry,
        )

    def watch(self, controller: Controller) -> None:
        self._controller = controller
        self.registry.register(ControlCollector(controller))
        self.registry.register(ProgressCollector(controller))

    def count_action(self, action: str, rule: str) -> None:
        self.actions.labels(action, rule).inc()

    def expect_actions(self, rules: Iterable[RuleConfig]) -> None:
        """Start the action counters each rule (and an operator) can move at 0. rate()
        and increase() see no change in a series whose first sample is already 1, so
        without this the first pause by a rule would show in no graph or annotation."""
        for rule in rules:
            actions = (("power_cap", "restore") if rule.action == "power_cap"
                       else ("pause", "slow", "resume"))
            for action in actions:
                self.actions.labels(action, rule.name)
        for action in ("pause", "resume"):
            self.actions.labels(action, OPERATOR)
        _CHANGES.bump()

    def _key(self) -> tuple[Any, ...]:
        """What the exposition is made of, read before rendering: a change after this
        read moves the key on, so the next scrape renders again."""
        controller = self._controller
        if controller is None:
            return (self._store.latest, None, (), _CHANGES.token)
        return (self._store.latest, controller.view,
                tuple(sorted(controller.power_caps.items())), _CHANGES.token)

    @staticmethod
    def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
        # identity for the snapshot and the view: both are replaced, never changed
        return a[0] is b[0] and a[1] is b[1] and a[2] == b[2] and a[3] == b[3]

    def cached(self) -> bytes | None:
        """The exposition if nothing changed since it was rendered, else None: cheap
        enough for the event loop, which serves it without a trip to the thread pool."""
        cached = self._cached
        if cached is not None and self._same(cached[0], self._key()):
            return cached[1]
        return None

    def render(self) -> bytes:
        body = self.cached()
        if body is not None:
            return body
        # One render at a time: scrapers that arrive together after a round wait for it
        # and share it instead of each rendering the same bytes.
        with self._render_lock:
            key = self._key()
            cached = self._cached
            if cached is not None and self._same(cached[0], key):
                return cached[1]
            body = generate_latest(self.registry)
            self._cached = (key, body)
            return body


class ProgressCollector(Collector):
    """What cooperative jobs report with their directive polls (steps, step durations,
    deferrals), from the jobs in the controller's published view.

    Its families appear only once a job has reported, so an exposition without
    cooperative jobs is as it was (and the golden file with it)."""

    def __init__(self, controller: Controller):
        self._controller = controller

    def collect(self) -> Iterator[Metric]:
        reported = [(job, job.progress) for job in self._controller.view.jobs
                    if job.progress is not None and job.state != "gone"]
        if not reported:
            return
        steps = CounterMetricFamily(
            PREFIX + "job_steps", "Steps a cooperative job reported since it registered.",
            labels=["job", "id"])
        durations = HistogramMetricFamily(
            PREFIX + "job_step_seconds", "Time between a cooperative job's checkpoints, "
            "per step, as the job measured it (holds and slow-down sleeps left out).",
            labels=["job", "id"])
        deferrals = CounterMetricFamily(
            PREFIX + "job_deferrals", "Pauses and slows a cooperative job put off because "
            "it was inside a critical section (at most policy.max_defer each).",
            labels=["job", "id"])
        for job, progress in reported:
            labels = [job.name, job.id]
            steps.add_metric(labels, progress.steps)
            deferrals.add_metric(labels, progress.deferrals)
            counts = progress.step_buckets
            if counts and progress.step_seconds is not None:
                durations.add_metric(
                    labels, [(bucket_label(b), c) for b, c in zip(STEP_BUCKETS, counts,
                                                                    strict=True)],
                    sum_value=progress.step_seconds)
        yield steps
        yield durations
        yield deferrals
