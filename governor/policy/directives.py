"""From rule states to what each job must do, and which GPUs to cap.

A rule on a per-device metric (one with a `gpu` or `device` label) touches only the jobs
bound to that device; a rule on a host metric touches every job. `max_priority` spares
the jobs above it. The most restrictive directive wins: pause over slow, the lower speed
over the higher. Pure, like the rule evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from governor.catalog import SAMPLED
from governor.config import RuleConfig, format_duration
from governor.jobs.model import RUN, Directive, Job, pause, slow, strictest
from governor.policy.rules import RuleStates, SeriesState, over, series_name
from governor.snapshot import Labels

OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class PowerCap:
    """A GPU to cap while a power_cap rule holds it and jobs are bound to it."""

    gpu: str
    watts: float
    rules: tuple[str, ...]
    reasons: tuple[str, ...]


def device_of(rule: RuleConfig, labels: Labels) -> str | None:
    """The job device a series belongs to: gpu="1" is "gpu1", device="card0" is "card0";
    None for host metrics."""
    label = SAMPLED[rule.metric].device_label
    if label is None:
        return None
    value = dict(labels).get(label)
    if value is None:
        return None
    return f"gpu{value}" if label == "gpu" else value


def reason(rule: RuleConfig, labels: Labels, state: SeriesState) -> str:
    """Why a holding series acts, true at every point of its hysteresis: over the line it
    names the reading; inside the band (or past the clear line while `clear_for` runs) it
    says what tripped it, what releases it, and where the reading is now."""
    series = series_name(rule, labels)
    if state.value is None:
        return f"{rule.name}: {series} stopped reporting (on_missing = {rule.on_missing})"
    side, clear_side = ("above", "below") if rule.trips_above else ("below", "above")
    if over(rule, state.value):
        return f"{rule.name}: {series} = {state.value:g} ({side} {rule.threshold:g})"
    line = rule.threshold if state.tripped_line is None else state.tripped_line
    tripped = ("when it stopped reporting" if state.tripped_value is None
               else f"{side} {line:g} at {state.tripped_value:g}")
    until = f"{clear_side} {rule.clear_threshold:g}"
    if rule.clear_for > 0:
        until += f" for {format_duration(rule.clear_for)}"
    return f"{rule.name}: {series} tripped {tripped}; held until {until}; now {state.value:g}"


def touches(rule: RuleConfig, device: str | None, job: Job) -> bool:
    """Whether a series of this rule on this device acts on this job."""
    if rule.max_priority is not None and job.priority > rule.max_priority:
        return False
    return device is None or device in job.bound_devices


def touched(rule: RuleConfig, device: str | None, jobs: Sequence[Job],
            by_device: Mapping[str, list[Job]]) -> list[Job]:
    """The jobs a holding series acts on: those bound to its device (every job for a host
    metric), but for the ones above the rule's max_priority."""
    candidates = jobs if device is None else by_device.get(device, [])
    if rule.max_priority is None:
        return list(candidates)
    return [job for job in candidates if job.priority <= rule.max_priority]


#: a hold loop's speed at or above 1 - this is full speed: no directive
FULL_SPEED_EPSILON = 1e-3
#: a hold loop's speed is given to jobs in steps of this much, so a loop settling by a
#: thousandth does not make a new directive every round
HOLD_SPEED_STEP = 0.01

#: rule name -> series labels -> the speed its hold loop asks for
HoldOutputs = Mapping[str, Mapping[Labels, float]]
#: GPU index -> (the driver's lowest power limit, the limit before governor set any), W
PowerRanges = Mapping[str, tuple[float, float]]


def hold_reason(rule: RuleConfig, labels: Labels, value: float | None, speed: float,
                watts: float | None = None) -> str:
    """Why a hold rule holds back: its target, where the reading is, what the loop asks."""
    now = "missing" if value is None else f"{value:g}"
    what = f"speed {speed:.2f}" if watts is None else \
        f"power limit {watts:.0f} W (speed {speed:.2f})"
    assert rule.target is not None
    return (f"{rule.name}: holding {series_name(rule, labels)} at {rule.target:g} "
            f"(now {now}): {what}")


def hold_watts(speed: float, low: float, original: float) -> float:
    """The power limit a hold loop's speed stands for: the driver's lowest limit at 0, the
    original limit at 1, linear between."""
    return low + min(max(speed, 0.0), 1.0) * (original - low)


def decide(
    rules: Iterable[RuleConfig], states: RuleStates, jobs: Sequence[Job],
    holds: HoldOutputs | None = None, power_ranges: PowerRanges | None = None,
) -> tuple[dict[str, Directive], dict[str, PowerCap]]:
    """The directive of every job, and the power cap of every GPU that needs one. A hold
    rule acts by the speed its loop asks for (`holds`): below full speed it slows the jobs
    the series touches (0 pauses them), or, with via = "power_limit", sets the GPU's power
    limit between the ends of its range (`power_ranges`) instead."""
    asks: dict[str, list[Directive]] = {job.id: [] for job in jobs}
    caps: dict[str, PowerCap] = {}
    settled: dict[tuple[int, ...], Directive] = {}
    # one pass over the jobs, so that each series looks only at its device's jobs
    by_device: dict[str, list[Job]] = {}
    for job in jobs:
        for bound in job.bound_devices:
            by_device.setdefault(bound, []).append(job)
    operator = pause("operator pause", rules=(OPERATOR,))
    for job in jobs:
        if job.held_by_operator:
            asks[job.id].append(operator)
    for rule in rules:
        if rule.holds:
            _hold(rule, states, (holds or {}).get(rule.name, {}), power_ranges or {}, jobs,
                  by_device, asks, caps)
            continue
        for labels, state in states.get(rule.name, {}).items():
            if not state.holding:
                continue
            device = device_of(rule, labels)
            why = reason(rule, labels, state)
            acted_on = touched(rule, device, jobs, by_device)
            if rule.action == "power_cap":
                if device is not None and acted_on:
                    assert rule.power_cap_watts is not None
                    caps[device] = _tighter(caps.get(device), rule, device,
                                            rule.power_cap_watts, why)
                continue
            if rule.action == "pause":
                ask = pause(why, rules=(rule.name,), defer=rule.defer)
            else:
                assert rule.speed is not None
                ask = slow(rule.speed, why, rules=(rule.name,), defer=rule.defer)
            for job in acted_on:  # one directive per series, shared: it is frozen
                asks[job.id].append(ask)
    return {job_id: _strictest(d, settled) if d else RUN for job_id, d in asks.items()}, caps


def _strictest(asks: list[Directive], settled: dict[tuple[int, ...], Directive]) -> Directive:
    """`strictest`, settled once per distinct list of asks: the jobs of one device share
    their series' directives (the same objects, see `decide`), so at 1,000 jobs most
    lists repeat. Keyed by the objects' ids, which `asks` keeps alive for the call."""
    key = tuple(map(id, asks))
    found = settled.get(key)
    if found is None:
        found = settled[key] = strictest(asks)
    return found


def _hold(rule: RuleConfig, states: RuleStates, speeds: Mapping[Labels, float],
          ranges: PowerRanges, jobs: Sequence[Job], by_device: Mapping[str, list[Job]],
          asks: dict[str, list[Directive]], caps: dict[str, PowerCap]) -> None:
    """What a hold rule's loops ask of the jobs (or of the GPUs) this round."""
    series = states.get(rule.name, {})
    for labels, speed in speeds.items():
        if speed >= 1.0 - FULL_SPEED_EPSILON:
            continue
        state = series.get(labels)
        value = state.value if state is not None else None
        device = device_of(rule, labels)
        acted_on = touched(rule, device, jobs, by_device)
        if not acted_on:
            continue
        if rule.via == "power_limit":
            limits = ranges.get(device.removeprefix("gpu")) if device is not None else None
            if device is None or limits is None:
                continue
            watts = hold_watts(speed, *limits)
            caps[device] = _tighter(caps.get(device), rule, device, watts,
                                    hold_reason(rule, labels, value, speed, watts))
            continue
        given = max(round(round(speed / HOLD_SPEED_STEP) * HOLD_SPEED_STEP, 6), rule.min_speed)
        if given >= 1.0 - FULL_SPEED_EPSILON:
            continue
        why = hold_reason(rule, labels, value, speed)
        ask = (pause(why, rules=(rule.name,), defer=rule.defer) if given <= 0 else
               slow(given, why, rules=(rule.name,), defer=rule.defer))
        for job in acted_on:
            asks[job.id].append(ask)


def _tighter(current: PowerCap | None, rule: RuleConfig, device: str, watts: float,
             why: str) -> PowerCap:
    gpu = device.removeprefix("gpu")
    if current is None:
        return PowerCap(gpu, watts, (rule.name,), (why,))
    return PowerCap(
        gpu,
        min(current.watts, watts),
        tuple(dict.fromkeys((*current.rules, rule.name))),
        tuple(dict.fromkeys((*current.reasons, why))),
    )


def rule_states_view(
    rules: Iterable[RuleConfig], states: RuleStates, wall_offset: float,
    holds: HoldOutputs | None = None,
) -> list[dict[str, object]]:
    """/v1/rules: one entry per series a rule watches; `since` as wall-clock time. A hold
    rule has no lines (direction, threshold and clear_threshold are None) but a `target`,
    `via`, and per series the `output` its loop asks for (1: not holding back)."""
    view: list[dict[str, object]] = []
    for rule in rules:
        series: Mapping[Labels, SeriesState] = states.get(rule.name, {})
        lines: dict[str, object] = {
            "metric": rule.metric, "direction": "above" if rule.trips_above else "below",
            "threshold": rule.threshold, "clear_threshold": rule.clear_threshold}
        speeds = (holds or {}).get(rule.name, {})
        if rule.holds:
            lines = {"metric": rule.metric, "direction": None, "threshold": None,
                     "clear_threshold": None, "target": rule.target, "via": rule.via}
        if not series:
            view.append({"name": rule.name, "series": None, "labels": {}, "state": "ok",
                         "clearing": False, "missing": False, "value": None, "since": None,
                         "action": rule.action, **lines,
                         **({"output": None} if rule.holds else {})})
        for labels, state in sorted(series.items()):
            output = {"output": speeds.get(labels, 1.0)} if rule.holds else {}
            view.append({
                "name": rule.name,
                "series": series_name(rule, labels),
                "labels": dict(labels),
                "state": state.public_state,
                "clearing": state.phase.value == "clearing",
                "missing": state.missing,
                "value": state.value,
                "since": state.since + wall_offset,
                "action": rule.action,
                **lines,
                **output,
            })
    return view
