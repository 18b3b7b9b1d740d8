"""One typed, client-side view of a status, parsed once from its JSON.

`governor status` (report.py) and `governor top` (top.py) draw the same /v1/status JSON
(and `governor sample` draws a local `Snapshot.as_dict()`, the same shape without jobs
and rules). Each used to group readings by metric and look them up by labels its own
way; this module is that one parse, so both renderers read the same fields the same way
and a change to the wire shape is met in one place.

It reads the JSON, not the daemon's models: the CLI talks to the daemon over HTTP only
(ARCHITECTURE.md), so this imports nothing but the standard library. It is as tolerant
of a missing or null key as the renderers were: a list that is absent or null is empty,
an optional field is None. Keys every renderer indexed directly (a reading's metric,
labels and value; a sampler's name; a rule series' name and state; a job's id, name and
state) are still required, and a status that lacks one fails to parse.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

#: a rule series is found by the reading it watches: its metric and its labels
SeriesKey = tuple[str, frozenset[tuple[str, str]]]


def series_key(metric: str, labels: Mapping[str, str]) -> SeriesKey:
    """The key of one series: label order does not matter, as it does not to a rule."""
    return metric, frozenset(labels.items())


def _items(data: Mapping[str, Any], key: str) -> list[Any]:
    """A list member of the JSON, empty where it is absent or null."""
    return list(data.get(key) or [])


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class Reading:
    """One reading of one series: a metric, its labels and the value of this round."""

    metric: str
    labels: Mapping[str, str]
    value: float

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Reading:
        return cls(str(data["metric"]), MappingProxyType(dict(data["labels"])),
                   float(data["value"]))


@dataclass(frozen=True, slots=True)
class Readings:
    """A round's readings grouped by metric, in the order they came in (a renderer's
    rows follow it), so a section asks for its metric once instead of scanning them all."""

    by_metric: Mapping[str, tuple[Reading, ...]] = field(
        default_factory=lambda: MappingProxyType({}))

    @classmethod
    def parse(cls, items: Iterable[Mapping[str, Any]]) -> Readings:
        grouped: dict[str, list[Reading]] = {}
        for item in items:
            reading = Reading.parse(item)
            grouped.setdefault(reading.metric, []).append(reading)
        return cls(MappingProxyType({m: tuple(rs) for m, rs in grouped.items()}))

    def __contains__(self, metric: object) -> bool:
        return metric in self.by_metric

    def of(self, metric: str) -> tuple[Reading, ...]:
        """Every reading of a metric; none where the round has none."""
        return self.by_metric.get(metric, ())

    def value(self, metric: str, **labels: str) -> float | None:
        """The first reading of `metric` whose labels include `labels`; None where there
        is none (a sensor this machine lacks is shown as missing, not as an error)."""
        for reading in self.of(metric):
            if all(reading.labels.get(k) == v for k, v in labels.items()):
                return reading.value
        return None


@dataclass(frozen=True, slots=True)
class Sampler:
    """One sampler's health this round."""

    name: str
    #: "ok", "error" or "unavailable"; "?" where the JSON has none
    state: str
    duration_seconds: float
    #: why it failed or is unavailable
    error: str | None = None
    #: what it could not read although it ran (a sensor file that failed)
    problems: tuple[str, ...] = ()
    #: when a failing sampler is tried again (wall-clock seconds)
    retry_at: float | None = None

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Sampler:
        error = data.get("error")
        return cls(
            name=str(data["name"]),
            state=str(data.get("state", "?")),
            duration_seconds=float(data.get("duration_seconds") or 0.0),
            error=str(error) if error else None,
            problems=tuple(str(p) for p in data.get("problems") or []),
            retry_at=float(data["retry_at"]) if data.get("retry_at") else None,
        )


@dataclass(frozen=True, slots=True)
class RuleSeries:
    """One rule on one series (a rule with no series yet has one entry, `series` None)."""

    name: str
    state: str
    #: the series' name (`metric{labels}`); None before the rule has seen a reading
    series: str | None = None
    metric: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    value: float | None = None
    #: wall-clock seconds when it entered its state
    since: float | None = None
    action: str | None = None
    #: it trips above the threshold (else below)
    above: bool = True
    threshold: float | None = None
    clear_threshold: float | None = None
    clearing: bool = False
    missing: bool = False
    enforceable: bool = True
    not_enforceable_because: str | None = None
    #: hold rules (action "hold"): the value held, the speed the loop asks for (1: not
    #: holding back; None before a series), and what it sets ("speed", "power_limit")
    target: float | None = None
    output: float | None = None
    via: str | None = None

    @property
    def holds(self) -> bool:
        """A hold rule, which has a target instead of trip lines."""
        return self.target is not None

    @property
    def holding_back(self) -> bool:
        """A hold rule's loop asks for less than full speed."""
        return self.output is not None and self.output < 1.0 - 1e-3

    def hold_text(self) -> str:
        """What a hold rule's series does: its target and its loop's output."""
        via = " via power limit" if self.via == "power_limit" else ""
        output = "-" if self.output is None else f"{self.output:.2f}"
        return f"hold at {self.target:g}{via}: output {output}"

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> RuleSeries:
        action, because = data.get("action"), data.get("not_enforceable_because")
        return cls(
            name=str(data["name"]),
            state=str(data["state"]),
            series=None if data.get("series") is None else str(data["series"]),
            metric=str(data.get("metric") or ""),
            labels=MappingProxyType(dict(data.get("labels") or {})),
            value=_optional_float(data.get("value")),
            since=_optional_float(data.get("since")),
            action=None if action is None else str(action),
            above=data.get("direction", "above") == "above",
            threshold=_optional_float(data.get("threshold")),
            clear_threshold=_optional_float(data.get("clear_threshold")),
            clearing=bool(data.get("clearing")),
            missing=bool(data.get("missing")),
            enforceable=data.get("enforceable") is not False,
            not_enforceable_because=None if because is None else str(because),
            target=_optional_float(data.get("target")),
            output=_optional_float(data.get("output")),
            via=None if data.get("via") is None else str(data["via"]),
        )

    @property
    def key(self) -> SeriesKey | None:
        """The reading it watches; None until it has a series and a metric."""
        if self.series is None or not self.metric:
            return None
        return series_key(self.metric, self.labels)


@dataclass(frozen=True, slots=True)
class Job:
    """One registered job and how it is held."""

    id: str
    name: str
    state: str
    pid: int | None = None
    mode: str | None = None
    devices: tuple[str, ...] = ()
    #: as the JSON gives it; "-" where it gives none
    priority: str = "-"
    speed: float | None = None
    reasons: tuple[str, ...] = ()
    held_by_operator: bool = False
    #: why holding it failed
    error: str | None = None
    #: where it came from ("api", "launch", "slurm"), the scheduler's id, its user
    source: str = "api"
    scheduler_id: str | None = None
    user: str | None = None
    #: "resumed" while someone outside governor lets it run during a pause (its state is
    #: then running, its reasons the pause's)
    outside: str | None = None

    @property
    def resumed_outside(self) -> bool:
        return self.outside == "resumed"

    @property
    def state_text(self) -> str:
        """The state as a person reads it: "running (resumed outside governor)" while an
        administrator's resume overrides governor's pause (so the pause's reasons beside
        it are not read as a hold in force), "(operator)" for an operator's hold."""
        notes = (["resumed outside governor"] if self.resumed_outside else []) + (
            ["operator"] if self.held_by_operator else [])
        return self.state + (f" ({'; '.join(notes)})" if notes else "")

    @property
    def origin(self) -> str:
        """Where it came from, as a person reads it: "api", "launch", "slurm 1234"."""
        return f"{self.source} {self.scheduler_id}" if self.scheduler_id else self.source

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Job:
        error, mode = data.get("error"), data.get("mode")
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            state=str(data["state"]),
            pid=data.get("pid"),
            mode=str(mode) if mode else None,
            devices=tuple(str(d) for d in data.get("devices") or []),
            priority=str(data.get("priority", "-")),
            speed=_optional_float(data.get("speed")),
            reasons=tuple(str(r) for r in data.get("reasons") or []),
            held_by_operator=bool(data.get("held_by_operator")),
            source=str(data.get("source") or "api"),
            scheduler_id=_optional_text(data.get("scheduler_id")),
            user=_optional_text(data.get("user")),
            error=str(error) if error else None,
            outside=_optional_text(data.get("outside")),
        )


@dataclass(frozen=True, slots=True)
class Audit:
    """The audit log's health: a log that cannot be written is a problem to show."""

    ok: bool
    path: str | None = None
    errors: int | None = None
    last_error: str | None = None

    @classmethod
    def parse(cls, data: Any) -> Audit | None:
        if not isinstance(data, Mapping):
            return None
        # shown as the JSON gives them: a count is not reformatted
        return cls(ok=data.get("ok") is not False, path=data.get("path"),
                   errors=data.get("errors"), last_error=data.get("last_error"))


@dataclass(frozen=True, slots=True)
class Status:
    """A whole status: the round (its number and start), its readings and samplers, and,
    from a daemon, the rule series, jobs, GPU power caps and audit log health."""

    #: the round's number; None before the first round
    sequence: int | None = None
    #: wall-clock seconds when the round started
    taken_at: float | None = None
    readings: Readings = field(default_factory=Readings)
    samplers: tuple[Sampler, ...] = ()
    rules: tuple[RuleSeries, ...] = ()
    jobs: tuple[Job, ...] = ()
    #: GPU index -> the watts it is capped at
    power_caps: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    #: GPU index -> pids of its compute processes
    gpu_pids: Mapping[str, tuple[int, ...]] = field(
        default_factory=lambda: MappingProxyType({}))
    audit: Audit | None = None
    #: series key -> the rule series watching that reading, in the order listed
    watching: Mapping[SeriesKey, tuple[RuleSeries, ...]] = field(
        default_factory=lambda: MappingProxyType({}))

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Status:
        rules = tuple(RuleSeries.parse(r) for r in _items(data, "rules"))
        watching: dict[SeriesKey, list[RuleSeries]] = {}
        for rule in rules:
            if rule.key is not None:
                watching.setdefault(rule.key, []).append(rule)
        return cls(
            sequence=data.get("sequence"),
            taken_at=_optional_float(data.get("taken_at")),
            readings=Readings.parse(_items(data, "readings")),
            samplers=tuple(Sampler.parse(s) for s in _items(data, "samplers")),
            rules=rules,
            jobs=tuple(Job.parse(j) for j in _items(data, "jobs")),
            power_caps=MappingProxyType(
                {str(k): float(v) for k, v in (data.get("power_caps") or {}).items()}),
            gpu_pids=MappingProxyType(
                {str(k): tuple(v or ()) for k, v in (data.get("gpu_pids") or {}).items()}),
            audit=Audit.parse(data.get("audit")),
            watching=MappingProxyType({k: tuple(v) for k, v in watching.items()}),
        )

    def watchers(self, metric: str, labels: Mapping[str, str]) -> tuple[RuleSeries, ...]:
        """The rule series watching one reading (a renderer colours it by their state)."""
        return self.watching.get(series_key(metric, labels), ())

    def rules_by_name(self) -> dict[str, list[RuleSeries]]:
        """Each rule's series, the rules in the order they are first listed."""
        grouped: dict[str, list[RuleSeries]] = {}
        for rule in self.rules:
            grouped.setdefault(rule.name, []).append(rule)
        return grouped


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)
