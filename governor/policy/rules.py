"""Rule evaluation: each series of each rule walks ok -> pending -> tripped -> clearing -> ok.

Pure: the next states are a function of the rules, the previous states, one snapshot and
its time, so the unit tests drive it with hand-made snapshots and no clock. As
systemd-oomd does, a single reading that breaks a condition resets its timer: a series
trips only after `for` seconds of readings all over the line, and clears only after
`clear_for` seconds of readings all past the clear line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from governor.config import RuleConfig
from governor.snapshot import Labels, Reading, Snapshot


class Phase(StrEnum):
    OK = "ok"
    PENDING = "pending"
    TRIPPED = "tripped"
    #: still tripped, while the clear condition has held for less than clear_for
    CLEARING = "clearing"


@dataclass(frozen=True, slots=True)
class SeriesState:
    phase: Phase
    #: monotonic time the current phase began (pending, clearing: when the condition did)
    since: float
    #: the last reading; None while the series is missing
    value: float | None
    #: monotonic time the series tripped (kept through clearing)
    tripped_at: float | None = None
    #: the reading that tripped it (kept through clearing), so that a reason given inside
    #: the hysteresis band can say what crossed the line; None when it tripped by going
    #: missing
    tripped_value: float | None = None
    #: the rule's trip line when it tripped: a reload may move the line since
    tripped_line: float | None = None
    #: the series did not report in the last round
    missing: bool = False

    @property
    def holding(self) -> bool:
        """A tripped series acts on jobs until it has fully cleared."""
        return self.phase in (Phase.TRIPPED, Phase.CLEARING)

    @property
    def public_state(self) -> str:
        """ok | pending | tripped, as /v1/rules and governor_rule_state show it."""
        return "tripped" if self.holding else self.phase.value


#: rule name -> series labels -> state
RuleStates = Mapping[str, Mapping[Labels, SeriesState]]


@dataclass(frozen=True, slots=True)
class Transition:
    rule: str
    labels: Labels
    before: Phase
    after: Phase
    value: float | None


def series_name(rule: RuleConfig, labels: Labels) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels)
    return f"{rule.metric}{{{inner}}}" if inner else rule.metric


def matches(rule: RuleConfig, reading: Reading) -> bool:
    if reading.metric != rule.metric:
        return False
    labels = dict(reading.labels)
    return all(labels.get(k) == v for k, v in rule.match.items())


def over(rule: RuleConfig, value: float) -> bool:
    """The trip condition: above the line (or below it, for `below` rules)."""
    return value > rule.threshold if rule.trips_above else value < rule.threshold


def past_clear_line(rule: RuleConfig, value: float) -> bool:
    """The clear condition, on the far side of the hysteresis band."""
    clear = rule.clear_threshold
    return value < clear if rule.trips_above else value > clear


def step(rule: RuleConfig, state: SeriesState | None, value: float, now: float) -> SeriesState:
    """One reading of one series. A hold rule's series never trips: its state only keeps
    the reading (the loop acts on it, see governor/control/holds.py)."""
    if rule.holds:
        return SeriesState(Phase.OK, state.since if state else now, value)
    if state is None or state.phase is Phase.OK:
        if not over(rule, value):
            return SeriesState(Phase.OK, state.since if state else now, value)
        if rule.for_ <= 0:
            return SeriesState(Phase.TRIPPED, now, value, tripped_at=now, tripped_value=value,
                               tripped_line=rule.threshold)
        return SeriesState(Phase.PENDING, now, value)
    if state.phase is Phase.PENDING:
        if not over(rule, value):
            return SeriesState(Phase.OK, now, value)
        if now - state.since >= rule.for_:
            return SeriesState(Phase.TRIPPED, now, value, tripped_at=now, tripped_value=value,
                               tripped_line=rule.threshold)
        return replace(state, value=value, missing=False)
    if state.phase is Phase.TRIPPED:
        if not past_clear_line(rule, value):
            return replace(state, value=value, missing=False)
        if rule.clear_for <= 0:
            return SeriesState(Phase.OK, now, value)
        return replace(state, phase=Phase.CLEARING, since=now, value=value, missing=False)
    # CLEARING
    if not past_clear_line(rule, value):
        return replace(state, phase=Phase.TRIPPED, since=now, value=value, missing=False)
    if now - state.since >= rule.clear_for:
        return SeriesState(Phase.OK, now, value)
    return replace(state, value=value, missing=False)


def step_missing(rule: RuleConfig, state: SeriesState, now: float) -> SeriesState | None:
    """A series that reported before and did not this round; None forgets it. A hold
    rule's series is kept, missing (its loop holds its last output), unless
    on_missing = "clear"."""
    if rule.holds:
        return None if rule.on_missing == "clear" else replace(state, value=None, missing=True)
    if rule.on_missing == "clear" or (rule.on_missing == "hold" and state.phase is Phase.OK):
        return None
    if rule.on_missing == "trip" and not state.holding:
        return SeriesState(Phase.TRIPPED, now, None, tripped_at=now, missing=True)
    if rule.on_missing == "trip" and state.phase is Phase.CLEARING:
        return replace(state, phase=Phase.TRIPPED, since=now, value=None, missing=True)
    return replace(state, value=None, missing=True)


def evaluate_rules(
    rules: Iterable[RuleConfig], states: RuleStates, snapshot: Snapshot, now: float
) -> tuple[dict[str, dict[Labels, SeriesState]], list[Transition]]:
    new_states: dict[str, dict[Labels, SeriesState]] = {}
    transitions: list[Transition] = []
    by_metric: dict[str, list[Reading]] = {}
    for r in snapshot.readings:
        by_metric.setdefault(r.metric, []).append(r)
    for rule in rules:
        previous = states.get(rule.name, {})
        current: dict[Labels, SeriesState] = {}
        for r in by_metric.get(rule.metric, ()):
            if matches(rule, r):
                current[r.labels] = step(rule, previous.get(r.labels), r.value, now)
        for labels, state in previous.items():
            if labels not in current:
                kept = step_missing(rule, state, now)
                if kept is not None:
                    current[labels] = kept
        for labels in previous.keys() | current.keys():
            before = previous[labels].phase if labels in previous else Phase.OK
            after = current[labels].phase if labels in current else Phase.OK
            if before is not after:
                value = current[labels].value if labels in current else None
                transitions.append(Transition(rule.name, labels, before, after, value))
        new_states[rule.name] = current
    return new_states, transitions


def carry_over(
    old_rules: Iterable[RuleConfig], new_rules: Iterable[RuleConfig], states: RuleStates
) -> dict[str, dict[Labels, SeriesState]]:
    """The states a reload keeps: those of rules whose name and metric are unchanged, for
    the series the new `match` still selects."""
    old = {r.name: r for r in old_rules}
    kept: dict[str, dict[Labels, SeriesState]] = {}
    for rule in new_rules:
        before = old.get(rule.name)
        if before is None or before.metric != rule.metric or rule.name not in states:
            continue
        kept[rule.name] = {
            labels: state for labels, state in states[rule.name].items()
            if all(dict(labels).get(k) == v for k, v in rule.match.items())
        }
    return kept
