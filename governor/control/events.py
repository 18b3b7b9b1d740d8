"""What the controller tells of what it does: an audit event per action and request (who,
what, which job, why, with the readings and the round behind it), and one structured
line per action on the "governor.actions" logger.

The controller owns one `Events`, holding the audit sink the daemon gave it; the rules,
states and round an event cites are the controller's, passed in with each event.

Anyone who can reach the unix socket can make requests, and each one, refused or not, is
an event: unlimited, one user could rotate every other user's record out of the audit
log within a minute. So the events of each restricted caller's requests (a uid over the
socket: the request, its refusal, and what it does to that user's jobs), and each job's
deferral reports (which any reader of the API can send), have a budget (`Budget`): the
first `audit.per_user_events` in each `audit.per_user_window` are written in full, the
rest are counted, and one "suppressed" event says how many, and of what, when the
window closes. Root and token holders are trusted: their events are always written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from governor.config import AuditConfig, RuleConfig, format_duration
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


@dataclass
class Window:
    """One payer's events since `opened`: how many were written, and what was counted."""

    opened: float
    #: the wall time it opened, for the summary
    since: float
    who: str
    #: the job every event in the window was about, if they all were about one
    job: dict[str, Any] | None
    written: int = 0
    counted: Counter[str] = field(default_factory=Counter)


class Budget:
    """At most `events` events per payer per `window` seconds are written in full."""

    def __init__(self, events: int, window: float, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.events, self.window = events, window
        self._clock, self._wall = clock, wall
        self._windows: dict[str, Window] = {}

    def take(self, payer: str, what: str, who: str, job: dict[str, Any] | None) -> bool:
        """True: write this event; False: it is counted in the payer's window. A window
        that has ended must have been closed (`closed`) first."""
        window = self._windows.get(payer)
        if window is None:
            window = self._windows[payer] = Window(self._clock(), self._wall(), who, job)
        elif window.job != job:
            window.job = None  # the summary names a job only if every event did
        if window.written < self.events:
            window.written += 1
            return True
        window.counted[what] += 1
        return False

    def closed(self) -> list[Window]:
        """The windows that have ended and counted something; every ended window is
        forgotten, so the payer's next event opens a new one."""
        now = self._clock()
        ended = [p for p, w in self._windows.items() if now - w.opened >= self.window]
        return [w for w in map(self._windows.pop, ended) if w.counted]


class Events:
    def __init__(self, audit: AuditSink = no_audit, limits: AuditConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self._audit = audit
        limits = limits or AuditConfig()
        self._budget = Budget(limits.per_user_events, limits.per_user_window, clock, wall)
        #: the restricted caller whose request is being handled (see `refusals`)
        self._requester: Caller | None = None

    def configure(self, limits: AuditConfig) -> None:
        """A reload: the new budget applies from the next window."""
        self._budget.events, self._budget.window = (limits.per_user_events,
                                                    limits.per_user_window)

    def emit(self, what: str, who: str, job: Job | dict[str, Any] | None, *,
             reasons: Iterable[str] = (), readings: Iterable[dict[str, Any]] = (),
             round_: int | None = None, payer: str | None = None, **more: Any) -> None:
        """One audit event; the sink never raises, and a broken one stops no action.
        `payer`: whose budget the event is charged to; by default, the restricted
        caller whose request is being handled, for an event about that caller's job."""
        ref = job_ref(job) if isinstance(job, Job) else job
        self.flush()
        requester = self._requester
        if (payer is None and requester is not None and isinstance(job, Job)
                and job.restricted_uid == requester.uid):
            payer = f"uid {requester.uid}"
        if payer is not None and not self._budget.take(payer, what, who, ref):
            return
        self._write({"who": who, "what": what, "job": ref,
                     "why": {"reasons": list(reasons), "readings": list(readings)},
                     "round": round_, **more})

    def flush(self) -> None:
        """One "suppressed" event for each budget window that has closed with events
        counted instead of written (called each round, and before each event)."""
        for window in self._budget.closed():
            total = sum(window.counted.values())
            kinds = ", ".join(f"{n} {what}" for what, n in window.counted.most_common())
            self._write({"who": window.who, "what": "suppressed", "job": window.job,
                         "why": {"reasons": [
                             f"{total} more event(s) from {window.who} within "
                             f"{format_duration(self._budget.window)} were counted, not "
                             f"written ({kinds}): audit.per_user_events = "
                             f"{self._budget.events}"], "readings": []},
                         "round": None, "since": window.since, "count": total,
                         "counted": dict(window.counted)})

    def _write(self, event: dict[str, Any]) -> None:
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
        class); the audit sink's owner turns it into what the log says of it. While it
        runs, a restricted caller's events are charged to its uid's budget."""
        payer = f"uid {caller.uid}" if caller.restricted else None
        self._requester = caller if caller.restricted else None
        try:
            yield
        except RegistrationError as exc:
            self.emit(f"{what}-refused", str(caller), job, reasons=[exc.message],
                      payer=payer, refusal=type(exc))
            raise
        finally:
            self._requester = None


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
