"""Which readings made a rule act: the structured "why" of the audit log.

Pure, like the rest of the policy: it reads the rule states the controller keeps, so an
audit event can name the series, its value and the line it crossed, not only a sentence.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from governor.config import RuleConfig
from governor.jobs.model import Job
from governor.policy.directives import device_of, touches
from governor.policy.rules import RuleStates, series_name


def readings(
    rules: Iterable[RuleConfig],
    states: RuleStates,
    names: Collection[str],
    *,
    holding: bool,
    job: Job | None = None,
    gpu: str | None = None,
) -> list[dict[str, Any]]:
    """The series of the rules `names` that bear on `job` (or on GPU `gpu`).

    holding=True (a pause, slow or power cap): the series that hold, with the trip line.
    holding=False (a release): every such series, with the line it had to cross to clear.
    """
    found: list[dict[str, Any]] = []
    for rule in rules:
        if rule.name not in names:
            continue
        for labels, state in sorted(states.get(rule.name, {}).items()):
            if holding and not state.holding:
                continue
            device = device_of(rule, labels)
            if job is not None and not touches(rule, device, job):
                continue
            if gpu is not None and device != f"gpu{gpu}":
                continue
            found.append({
                "rule": rule.name,
                "series": series_name(rule, labels),
                "value": state.value,
                "threshold": rule.threshold if holding else rule.clear_threshold,
                "state": state.public_state,
            })
    return found
