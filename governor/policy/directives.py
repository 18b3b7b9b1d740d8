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


def decide(
    rules: Iterable[RuleConfig], states: RuleStates, jobs: Sequence[Job]
) -> tuple[dict[str, Directive], dict[str, PowerCap]]:
    """The directive of every job, and the power cap of every GPU that needs one."""
    asks: dict[str, list[Directive]] = {job.id: [] for job in jobs}
    caps: dict[str, PowerCap] = {}
    # one pass over the jobs, so that each series looks only at its device's jobs
    by_device: dict[str, list[Job]] = {}
    for job in jobs:
        for bound in job.bound_devices:
            by_device.setdefault(bound, []).append(job)
    for job in jobs:
        if job.held_by_operator:
            asks[job.id].append(pause("operator pause", rules=(OPERATOR,)))
    for rule in rules:
        for labels, state in states.get(rule.name, {}).items():
            if not state.holding:
                continue
            device = device_of(rule, labels)
            why = reason(rule, labels, state)
            acted_on = touched(rule, device, jobs, by_device)
            if rule.action == "power_cap":
                if device is not None and acted_on:
                    caps[device] = _tighter(caps.get(device), rule, device, why)
                continue
            for job in acted_on:
                if rule.action == "pause":
                    asks[job.id].append(pause(why, rules=(rule.name,), defer=rule.defer))
                else:
                    assert rule.speed is not None
                    asks[job.id].append(slow(rule.speed, why, rules=(rule.name,),
                                             defer=rule.defer))
    return {job_id: strictest(d) if d else RUN for job_id, d in asks.items()}, caps


def _tighter(current: PowerCap | None, rule: RuleConfig, device: str, why: str) -> PowerCap:
    assert rule.power_cap_watts is not None
    gpu = device.removeprefix("gpu")
    if current is None:
        return PowerCap(gpu, rule.power_cap_watts, (rule.name,), (why,))
    return PowerCap(
        gpu,
        min(current.watts, rule.power_cap_watts),
        tuple(dict.fromkeys((*current.rules, rule.name))),
        tuple(dict.fromkeys((*current.reasons, why))),
    )


def rule_states_view(
    rules: Iterable[RuleConfig], states: RuleStates, wall_offset: float
) -> list[dict[str, object]]:
    """/v1/rules: one entry per series a rule watches; `since` as wall-clock time."""
    view: list[dict[str, object]] = []
    for rule in rules:
        series: Mapping[Labels, SeriesState] = states.get(rule.name, {})
        lines = {"metric": rule.metric, "direction": "above" if rule.trips_above else "below",
                 "threshold": rule.threshold, "clear_threshold": rule.clear_threshold}
        if not series:
            view.append({"name": rule.name, "series": None, "labels": {}, "state": "ok",
                         "clearing": False, "missing": False, "value": None, "since": None,
                         "action": rule.action, **lines})
        for labels, state in sorted(series.items()):
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
            })
    return view
