"""The loops of the hold rules (action "hold", CONTRACT section 8): one hold law
(`laws.hold_step`) per series a hold rule watches, keyed like the rule states, by rule
name and then the series' labels.

They live here, beside the controller, not in policy/: the law is a control law
(control/laws.py, which policy may not import), and its state is what the controller
remembers between rounds, as the rule states are. Policy stays pure and law-free: `decide`
receives only the speed each loop asks for (`outputs`).

Pure, like the law: the states, the rule states (which carry each series' reading), which
series act on something, and the snapshot's monotonic time in; the next states out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from governor.config import RuleConfig
from governor.control.laws import HoldState, hold_step, start_hold
from governor.policy.rules import RuleStates
from governor.snapshot import Labels

#: rule name -> series labels -> the loop's state
HoldLoops = Mapping[str, Mapping[Labels, HoldState]]


def step_holds(
    rules: Iterable[RuleConfig], loops: HoldLoops, states: RuleStates,
    acting: Callable[[RuleConfig, Labels], bool], now: float,
    applied: Callable[[RuleConfig, Labels], float | None] = lambda rule, labels: None,
) -> dict[str, dict[Labels, HoldState]]:
    """One round of every hold rule's loops. A series whose rule state is gone is
    forgotten; one that acts on nothing (no job to slow, no GPU to limit) is forgotten too,
    so that it starts afresh, at full speed, when a job comes (the law would learn nothing
    true from speeds that move nothing); a missing reading (value None) holds the output.
    `applied` says at what speed the series' jobs really ran since the last round (a
    stricter hold may have overridden the loop's)."""
    stepped: dict[str, dict[Labels, HoldState]] = {}
    for rule in rules:
        if not rule.holds:
            continue
        assert rule.target is not None
        previous = loops.get(rule.name, {})
        current: dict[Labels, HoldState] = {}
        for labels, state in states.get(rule.name, {}).items():
            if not acting(rule, labels):
                continue
            loop = previous.get(labels) or start_hold(1.0)
            current[labels], _ = hold_step(loop, state.value, now, target=rule.target,
                                           min_speed=rule.min_speed,
                                           applied=applied(rule, labels))
        stepped[rule.name] = current
    return stepped


def carry_holds(old_rules: Iterable[RuleConfig], new_rules: Iterable[RuleConfig],
                loops: HoldLoops) -> dict[str, dict[Labels, HoldState]]:
    """The loops a reload keeps: those of hold rules whose name, metric, target and `via`
    are unchanged, for the series the new `match` still selects. A new target (or a loop
    now setting something else) starts afresh; a new min_speed is simply obeyed."""
    old = {r.name: r for r in old_rules}
    kept: dict[str, dict[Labels, HoldState]] = {}
    for rule in new_rules:
        before = old.get(rule.name)
        if (before is None or not rule.holds or not before.holds or rule.name not in loops
                or (before.metric, before.target, before.via)
                != (rule.metric, rule.target, rule.via)):
            continue
        kept[rule.name] = {
            labels: loop for labels, loop in loops[rule.name].items()
            if all(dict(labels).get(k) == v for k, v in rule.match.items())
        }
    return kept


def outputs(loops: HoldLoops) -> dict[str, dict[Labels, float]]:
    """The speed each loop asks for."""
    return {rule: {labels: loop.speed for labels, loop in series.items()}
            for rule, series in loops.items()}
