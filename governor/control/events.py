"""What the controller tells of what it does: an audit event per action and request (who,
what, which job, why, with the readings and the round behind it), and one structured
line per action on the "governor.actions" logger.

The controller owns one `Events`, holding the audit sink the daemon gave it; the rules,
states and round an event cites are the controller's, passed in with each event.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from governor.config import RuleConfig
from governor.jobs.errors import RegistrationError
from governor.jobs.model import Action, Directive, Job
from governor.jobs.registry import Caller, JobRequest
from governor.policy.directives import OPERATOR, PowerCap
from governor.policy.evidence import readings as readings_of
from governor.policy.rules import RuleStates

#: the controller's own log: a failing audit sink is the controller's news
log = logging.getLogger("governor.control.controller")
actions_log = logging.getLogger("governor.actions")

#: receives each audit event (who, what, job, why, round) under the lock: the daemon's
#: AuditLog.append, which never raises and never blocks on a disk
AuditSink = Callable[[dict[str, Any]], None]


def no_audit(_event: dict[str, Any]) -> None:
    return None


class Events:
    def __init__(self, audit: AuditSink = no_audit):
        self._audit = audit

    def emit(self, what: str, who: str, job: Job | dict[str, Any] | None, *,
             reasons: Iterable[str] = (), readings: Iterable[dict[str, Any]] = (),
             round_: int | None = None, **more: Any) -> None:
        """One audit event; the sink never raises, and a broken one stops no action."""
        event = {"who": who, "what": what,
                 "job": job_ref(job) if isinstance(job, Job) else job,
                 "why": {"reasons": list(reasons), "readings": list(readings)},
                 "round": round_, **more}
        try:
            self._audit(event)
        except Exception:
            log.exception("the audit sink failed")

    def action(self, action: str, who: str, job: Job, before: Directive,
               rules: Collection[str], *, config: list[RuleConfig], states: RuleStates,
               round_: int | None) -> None:
        """A pause, slow or resume, with the readings of the rules behind it."""
        held = job.directive.action is not Action.RUN
        by_rules = [r for r in rules if r != OPERATOR]
        reasons = job.directive.reasons if held else cleared(before.rules)
        self.emit(action, who, job, reasons=reasons,
                  readings=readings_of(config, states, by_rules, holding=held, job=job),
                  round_=round_ if by_rules else None, speed=job.directive.speed)

    def power(self, action: str, gpu: str, cap: PowerCap | None, previous: PowerCap | None,
              *, config: list[RuleConfig], states: RuleStates, round_: int | None) -> None:
        """A GPU power cap set, changed or lifted (`previous`: the cap it replaces)."""
        held = cap if cap is not None else previous
        rules = held.rules if held is not None else ()
        self.emit(action, ", ".join(f"rule {r}" for r in rules) or "governor", None,
                  reasons=cap.reasons if cap is not None else cleared(rules),
                  readings=readings_of(config, states, rules, holding=cap is not None,
                                       gpu=gpu),
                  round_=round_, gpu=gpu, watts=cap.watts if cap is not None else None)

    @contextlib.contextmanager
    def refusals(self, what: str, caller: Caller, job: dict[str, Any]) -> Iterator[None]:
        """A refused request is recorded too (as "<what>-refused") before it is answered.
        The event's last key, "refusal", is the kind of refusal (a RegistrationError
        class); the audit sink's owner turns it into what the log says of it."""
        try:
            yield
        except RegistrationError as exc:
            self.emit(f"{what}-refused", str(caller), job, reasons=[exc.message],
                      refusal=type(exc))
            raise


def job_ref(job: Job) -> dict[str, Any]:
    """The job as an audit event names it."""
    return {"id": job.id, "name": job.name, "pid": job.pid, "mode": job.mode.value}


def cleared(rules: Iterable[str]) -> list[str]:
    """Why a hold ended: the rules (or the operator hold) that held it let go."""
    return ["operator hold lifted" if r == OPERATOR else f"{r} cleared" for r in rules]


def requested(request: JobRequest) -> dict[str, Any]:
    """A job not yet admitted, as the request names it."""
    return {"id": None, "name": request.name, "pid": request.pid,
            "mode": request.mode.value if request.mode is not None else None}


def action_line(action: str, job: Job, *, by: str, directive: Directive | None = None) -> None:
    """One structured line per action: who or which rule, on which job, and why."""
    entry: dict[str, Any] = {"action": action, "job": job.name, "id": job.id,
                             "pid": job.pid, "mode": job.mode.value, "by": by}
    if directive is not None:
        entry["speed"] = directive.speed
        entry["reasons"] = list(directive.reasons)
    actions_log.info("%s", json.dumps(entry))


def power_line(action: str, gpu: str, rules: Iterable[str], cap: PowerCap | None) -> None:
    """One structured line per power cap action."""
    actions_log.info("%s", json.dumps({
        "action": action, "gpu": gpu, "rules": list(rules),
        "watts": cap.watts if cap else None,
        "reasons": list(cap.reasons) if cap else []}))
