"""The control side: rule states -> directives -> actuators, for the registered jobs.

Every change goes through here under one lock: a new snapshot (from the sampling loop),
a registration or an operator hold (from the API), a reload. After each, the controller
re-decides every job's directive, has the actuators bring the jobs to it, and publishes
an immutable view that the API and the metrics read without taking the lock, so a slow
cgroup freeze never stalls a scrape. The API never calls an actuator itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from governor.actuators.base import Actuator, ActuatorError, ProtectedProcessError
from governor.actuators.gpu_power import PowerCapper
from governor.client.progress import Progress, ProgressReport
from governor.config import Config, RuleConfig, format_duration
from governor.control.events import (
    AuditSink,
    Events,
    action_line,
    job_ref,
    no_audit,
    power_line,
    requested,
)
from governor.control.holds import HoldLoops, carry_holds, outputs, step_holds
from governor.control.view import ControlView, DirectiveView, JobView, LazyRules
from governor.jobs import process
from governor.jobs import scheduled as scheduled_jobs
from governor.jobs.errors import (
    Conflict,
    NoSuchJob,
    NotPermitted,
    NotRecorded,
    RegistrationError,
    Unacceptable,
)
from governor.jobs.exits import ExitWatch
from governor.jobs.model import RUN, Action, Directive, Job, Mode
from governor.jobs.registry import Caller, JobRegistry, JobRequest
from governor.jobs.services import ProtectedServices
from governor.policy.directives import (
    OPERATOR,
    PowerCap,
    decide,
    device_of,
    rule_states_view,
    touched,
)
from governor.policy.rules import Phase, RuleStates, Transition, carry_over, evaluate_rules
from governor.policy.rules import series_name as series_of
from governor.safety.journal import Journal
from governor.snapshot import Snapshot

log = logging.getLogger(__name__)

#: (job id, directive version), called on the controller's thread after a change
DirectiveListener = Callable[[str, int], None]


class Controller:
    def __init__(
        self,
        config: Config,
        journal: Journal,
        actuators: Mapping[Mode, Actuator],
        power: PowerCapper | None,
        *,
        unavailable_modes: Mapping[Mode, str] | None = None,
        power_unavailable: str | None = None,
        on_action: Callable[[str, str], None] = lambda action, rule: None,
        audit: AuditSink = no_audit,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self._lock = threading.RLock()
        self._rules: list[RuleConfig] = list(config.rules)
        self._forget_after = config.jobs.forget_gone_after
        #: the slurm.conf to ask Slurm whose a job is, when a user names one
        self._slurm_conf = config.slurm.conf
        self._expire_after = config.jobs.cooperative_expire_after
        #: the cooperative jobs with no process, which only their directive polls show to
        #: be alive: when each was last heard of (monotonic; a poll counts until its wait
        #: ends), for jobs.cooperative_expire_after
        self._heard: dict[str, float] = {}
        #: policy.max_defer, which every directive carries to cooperative clients
        self.max_defer = config.policy.max_defer
        self._states: RuleStates = {}
        #: the hold rules' loops, beside the rule states (see control/holds.py)
        self._holds: HoldLoops = {}
        self._journal = journal
        self._actuators = dict(actuators)
        self._unavailable_modes = dict(unavailable_modes or {})
        self._power = power
        self._power_unavailable = power.unavailable if power is not None else power_unavailable
        self._caps: dict[str, PowerCap] = {}
        #: why the power caps could not be applied last round, logged once
        self._power_error: str | None = None
        self._on_action = on_action
        self._events = Events(audit, config.audit, clock=clock, wall=wall)
        #: the sequence of the last snapshot evaluated: the round rule-made actions follow
        self._round: int | None = None
        self._clock = clock
        self._wall = wall
        self.registry = JobRegistry(
            max_per_user=config.jobs.max_per_user,
            services=ProtectedServices.of(config.jobs.protected_executables,
                                          config.jobs.protected_units))
        self._exits = ExitWatch()
        self._listeners: list[DirectiveListener] = []
        #: who last held or released each job by hand, for the action log
        self._operator: dict[str, str] = {}
        #: jobs whose directive changed since the view was last published; listeners hear
        #: of them only after it is, so a woken long-poll finds the new directive
        self._changed: dict[str, int] = {}
        self.view = ControlView()
        self._warn_unenforceable()
        self._publish()

    # ---- the sampling loop's hook --------------------------------------------------------

    def on_snapshot(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._round = snapshot.sequence
            self._notice_gone()
            self._bind_devices(snapshot)
            self._states, transitions = evaluate_rules(
                self._rules, self._states, snapshot, snapshot.monotonic
            )
            for transition in transitions:
                self._log_transition(transition)
            self._step_holds(snapshot.monotonic)
            self._events.flush()
            self._expire_unheard()
            self._enforce()

    # ---- requests from the API -----------------------------------------------------------

    def add_listener(self, listener: DirectiveListener) -> None:
        self._listeners.append(listener)

    def register(self, request: JobRequest, caller: Caller, *,
                 discovered: bool = False) -> dict[str, Any]:
        """Admit, attach and journal a job. `discovered`: a scheduler's source found it
        (its user may not unregister it)."""
        # Slurm's word on whose job it is, asked before the lock: a hung slurmctld must
        # not stall every round behind it
        not_theirs = None
        if caller.restricted and request.source == "slurm" and request.scheduler_id:
            assert caller.uid is not None
            not_theirs = scheduled_jobs.slurm_owner_problem(
                self._slurm_conf, request.scheduler_id, caller.uid)
        with self._lock, self._events.refusals("register", caller, requested(request)):
            job = self.registry.admit(request, caller, self._wall())
            if not_theirs is not None:
                raise NotPermitted(not_theirs)
            job.discovered = discovered
            if discovered and job.source == "slurm" and job.owner_uid is None:
                # the job's user may pause and resume it, never unregister it
                job.owner_uid = scheduled_jobs.slurm_user_uid(job.user)
            why = self._unavailable_modes.get(job.mode)
            if why is not None:
                raise Unacceptable(f"{job.mode.value} mode is not available here: {why}")
            try:
                self._actuators[job.mode].attach(job)
            except ActuatorError as exc:
                raise _refusal(exc) from None
            self._check_cgroup_free(job)
            self._watch_exit(job)
            try:
                self._journal.put_job(job.id, job.to_record())
            except OSError as exc:
                self._exits.forget(job.id)
                self._actuators[job.mode].detach(job)
                raise NotRecorded(f"The job was not registered: the journal cannot be "
                                  f"written ({exc.strerror}).") from None
            self.registry.add(job)
            self._hear_from(job)
            action_line("register", job, by=str(caller))
            self._events.emit("register", str(caller), job, devices=list(job.devices),
                               priority=job.priority, cgroup=job.cgroup)
            self._enforce()
            return job.as_dict()

    def adopt(self, records: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Take back the jobs an earlier run registered (from the journal): those whose
        process still runs, with their operator holds. Returns what was forgotten, why."""
        forgotten = []
        with self._lock:
            for job_id, record in records.items():
                try:
                    job = Job.from_record(job_id, record)
                except (KeyError, TypeError, ValueError) as exc:
                    forgotten.append(f"job {job_id}: unreadable record ({exc!r})")
                    self._journal.drop_job(job_id)
                    continue
                why = self._cannot_adopt(job)
                if why is not None:
                    forgotten.append(f"job {job.id} ({job.name}): {why}")
                    self._journal.drop_job(job.id)
                    continue
                self.registry.add(job)
                self._watch_exit(job)
                self._hear_from(job)
                self._journal.put_job(job.id, job.to_record())
                action_line("adopt", job, by="restart")
            self._enforce()
        for line in forgotten:
            log.warning("journal: %s; forgotten", line)
        return forgotten

    def _cannot_adopt(self, job: Job) -> str | None:
        if job.pid is not None and (job.pid_started_at is None or not process.is_alive(
                process.ProcessIdentity(job.pid, job.pid_started_at))):
            return f"process {job.pid} exited while governor was down"
        why = self._unavailable_modes.get(job.mode)
        if why is not None:
            return f"{job.mode.value} mode is not available here: {why}"
        try:
            self._actuators[job.mode].attach(job)
        except ActuatorError as exc:
            return str(exc)
        except Exception as exc:
            return f"its {job.mode.value} actuator failed: {exc!r}"
        return None

    def _check_cgroup_free(self, job: Job) -> None:
        """The actuator resolved the job's cgroup: no other live job may hold it, however
        either was spelled at registration."""
        if job.cgroup is None:
            return
        for other in self.registry.all():
            if other.gone_at is None and other.cgroup == job.cgroup:
                self._actuators[job.mode].detach(job)
                raise Conflict(f"Cgroup {job.cgroup} is already registered as "
                               f"job {other.id} ({other.name}).")

    def unregister(self, job_id: str, caller: Caller) -> None:
        with self._lock, self._events.refusals("unregister", caller, self._ref(job_id)):
            job = self._owned(job_id, caller)
            if caller.restricted and job.discovered:
                raise NotPermitted(f"Job {job.id} was found by the {job.source} source; "
                                   "only root or a token holder may unregister it.")
            self._check_may_lift(job, caller)
            self._forget(job, caller)

    def _forget(self, job: Job, caller: Caller) -> None:
        """Unregister a job, resuming it first (under the lock)."""
        was = job.directive
        self._exits.forget(job.id)
        self._detach(job)
        if job.directive.action is not Action.RUN:
            self._count("resume", job.directive.rules)
        self.registry.remove(job.id)
        self._journal.drop_job(job.id)
        self._operator.pop(job.id, None)
        self._heard.pop(job.id, None)
        job.directive = RUN
        job.directive_version += 1
        action_line("unregister", job, by=str(caller))
        held = [f"resumed first: it was {was.state}"] if was.action is not Action.RUN else []
        self._events.emit("unregister", str(caller), job, reasons=held)
        self._notify(job)
        self._publish()

    def supersede(self, job_ids: list[str], request: JobRequest,
                  caller: Caller) -> dict[str, Any]:
        """Discovery wins over any other registration of the same scheduler's job (a
        prolog's, or a decoy's): those are unregistered and the job is registered as the
        source found it, keeping an operator hold that one of them had."""
        with self._lock:
            holds = [(job.held_by, job.hold_uid) for job_id in job_ids
                     if (job := self._find(job_id)) is not None and job.held_by_operator]
            for job_id in job_ids:
                job = self._find(job_id)
                if job is not None:
                    self._forget(job, caller)
            registered = self.register(request, caller, discovered=True)
            if holds:
                job = self.registry.get(str(registered["id"]))
                privileged = [hold for hold in holds if hold[1] is None]
                job.held_by, job.hold_uid = (privileged or holds)[0]
                job.held_by_operator = True
                self._journal.put_job(job.id, job.to_record())
                self._enforce()
                registered = job.as_dict()
            return registered

    def _find(self, job_id: str) -> Job | None:
        try:
            return self.registry.get(job_id)
        except NoSuchJob:
            return None

    def scheduled(self, source: str, scheduler_id: str) -> list[str]:
        """The ids of the live jobs a scheduler's job is registered as."""
        return [job.id for job in self.registry.all()
                if job.gone_at is None and job.source == source
                and job.scheduler_id == scheduler_id]

    def note_outside(self, job: Job, what: str) -> None:
        """An actuator saw someone else let go of a job governor held: audited, and logged
        as an action line. what = "outside-resume" (the scheduler resumed it: governor
        stands aside) or "outside-continue" (its processes were continued while the
        scheduler still held it suspended: governor stopped them again)."""
        if what == "outside-continue":
            reason = (f"the processes of {job.source} job {job.scheduler_id} were continued "
                      f"while {job.source} still held it suspended (not a resume); governor "
                      "stopped them again until the rules let it go")
        else:
            reason = (f"{job.source} job {job.scheduler_id} was resumed by someone else "
                      "while governor held it; it is not held again until the rules let "
                      "it go")
        with self._lock:
            action_line(what, job, by="outside governor")
            self._events.emit(what, "outside governor", job, reasons=[reason],
                              round_=self._round)

    def hold(self, job_id: str, caller: Caller, held: bool) -> dict[str, Any]:
        """Operator pause (held=True) or resume (False); rules still apply after a resume."""
        what = "operator-pause" if held else "operator-resume"
        with self._lock, self._events.refusals(what, caller, self._ref(job_id)):
            job = self._owned(job_id, caller)
            if job.gone_at is not None:
                raise Conflict(f"Job {job.id} ({job.name}) has exited.")
            if not held:
                self._check_may_lift(job, caller)
                job.held_by, job.hold_uid = None, None
            elif not (job.held_by_operator and caller.restricted
                      and job.hold_uid != caller.uid):
                # a user's pause never takes over a hold someone else put in place
                job.held_by, job.hold_uid = str(caller), caller.uid
            job.held_by_operator = held
            # the action log names who holds the job: the hold's owner, not a user whose
            # pause left someone else's hold in place
            self._operator[job.id] = job.held_by or str(caller)
            self._journal.put_job(job.id, job.to_record())
            self._events.emit(what, str(caller), job, reasons=[
                "held by the operator until resumed" if held
                else "operator hold lifted; rules still apply"])
            self._enforce()
            return job.as_dict()

    def report_progress(self, job_id: str, report: ProgressReport) -> None:
        """A cooperative client's totals, carried by its directive poll. Only a change is
        published; a growing deferral count is audited and logged once per change, so
        "why did that job not stop at once?" has an answer in the audit log."""
        with self._lock:
            job = self.registry.get(job_id)
            before = job.progress or Progress()
            after = before.merged(report, self._wall())
            if after == before:
                return
            job.progress = after
            if after.deferrals > before.deferrals:
                new = after.deferrals - before.deferrals
                reasons = [f"the job put off a pause or slow in a critical section {new} "
                           f"time{'s' if new > 1 else ''} ({after.deferrals} in all; "
                           f"policy.max_defer = {self.max_defer:g} s)"]
                if job.directive.action is not Action.RUN:
                    reasons += [f"asked to {job.directive.action.value}: {r}"
                                for r in job.directive.reasons]
                action_line("deferral", job, by="cooperative client")
                self._events.emit("deferral", "cooperative client", job, reasons=reasons,
                                   payer=f"deferrals of job {job.id}",
                                   deferrals=after.deferrals, new=new)
            self._publish()

    def polled(self, job_id: str, wait: float) -> None:
        """A directive poll arrived that waits up to `wait` seconds: the job is alive until
        the wait ends. Called on the event loop, without the lock (one dict store)."""
        if job_id in self._heard:
            self._heard[job_id] = max(self._heard.get(job_id, 0.0), self._clock() + wait)

    def reload(self, config: Config) -> list[dict[str, Any]]:
        with self._lock:
            self._states = carry_over(self._rules, config.rules, self._states)
            self._holds = carry_holds(self._rules, config.rules, self._holds)
            self._rules = list(config.rules)
            self._forget_after = config.jobs.forget_gone_after
            self._expire_after = config.jobs.cooperative_expire_after
            self.registry.max_per_user = config.jobs.max_per_user
            self._events.configure(config.audit)
            self.max_defer = config.policy.max_defer
            self._warn_unenforceable()
            self._enforce()
            return list(self.view.rules)

    def shutdown(self) -> None:
        """Everything back to full speed, every process governor moved back in its own
        cgroups and every power limit restored; the registrations stay in the journal (a
        restarted daemon takes the jobs back)."""
        with self._lock:
            for job in self.registry.all():
                if job.gone_at is None:
                    try:
                        self._actuators[job.mode].apply(job, RUN)
                    except Exception as exc:
                        log.error("job %s (%s): could not release: %s", job.id, job.name, exc)
                    self._detach(job)
            if self._power is not None:
                try:
                    self._power.release_all()
                except Exception:
                    log.exception("power limits could not be restored")
            for actuator in self._actuators.values():
                try:
                    actuator.close()
                except Exception:
                    log.exception("an actuator failed to close")
            self._exits.close()
            if self._power is not None:
                self._power.close()

    # ---- reading -------------------------------------------------------------------------

    def job(self, job_id: str) -> JobView:
        for job in self.view.jobs:
            if job.id == job_id:
                return job
        raise NoSuchJob(f"There is no job {job_id!r}.")

    def directive(self, job_id: str) -> DirectiveView:
        found = self.view.directives.get(job_id)
        if found is None:
            raise NoSuchJob(f"There is no job {job_id!r}.")
        return found

    def actuator(self, mode: Mode) -> Actuator | None:
        return self._actuators.get(mode)

    def rule_states(self) -> RuleStates:
        return self._states

    def hold_loops(self) -> HoldLoops:
        return self._holds

    # ---- the work ------------------------------------------------------------------------

    def _check_may_lift(self, job: Job, caller: Caller) -> None:
        """A restricted caller may undo only an operator hold they put in place."""
        if caller.restricted and job.held_by_operator and job.hold_uid != caller.uid:
            raise NotPermitted(f"Job {job.id} was paused by {job.held_by or 'an operator'}; "
                               "only they, root or a token holder may lift that hold.")

    def _owned(self, job_id: str, caller: Caller) -> Job:
        job = self.registry.get(job_id)
        if caller.restricted and job.owner_uid != caller.uid:
            raise NotPermitted(f"Job {job_id} is not yours; only root may govern "
                               "another user's job.")
        return job

    def _live_jobs(self) -> tuple[list[Job], dict[str, list[Job]]]:
        jobs = [job for job in self.registry.all() if job.gone_at is None]
        by_device: dict[str, list[Job]] = {}
        for job in jobs:
            for bound in job.bound_devices:
                by_device.setdefault(bound, []).append(job)
        return jobs, by_device

    def _step_holds(self, now: float) -> None:
        """One round of the hold rules' loops, for the series that act on something: a
        job to slow, or (via = "power_limit") a GPU whose limit can be set, with a job."""
        jobs, by_device = self._live_jobs()

        def acting(rule: RuleConfig, labels: tuple[tuple[str, str], ...]) -> bool:
            device = device_of(rule, labels)
            if rule.via == "power_limit" and (device is None or self._power is None
                                              or self._power.unavailable is not None):
                return False
            return bool(touched(rule, device, jobs, by_device))

        def applied(rule: RuleConfig, labels: tuple[tuple[str, str], ...]) -> float | None:
            """The mean speed the series' jobs ran at since the last round (the directive
            last applied to each): below the loop's when something stricter held them."""
            held = touched(rule, device_of(rule, labels), jobs, by_device)
            if not held:
                return None
            return sum(job.directive.speed for job in held) / len(held)

        self._holds = step_holds(self._rules, self._holds, self._states, acting, now, applied)

    def _power_ranges(self) -> dict[str, tuple[float, float]]:
        """The power limit's range of each GPU a hold rule sets the limit of."""
        ranges: dict[str, tuple[float, float]] = {}
        if self._power is None:
            return ranges
        for rule in self._rules:
            if not (rule.holds and rule.via == "power_limit"):
                continue
            for labels in self._holds.get(rule.name, {}):
                device = device_of(rule, labels)
                if device is None:
                    continue
                gpu = device.removeprefix("gpu")
                if gpu not in ranges:
                    found = self._power.limit_range(gpu)
                    if found is not None:
                        ranges[gpu] = found
        return ranges

    def _enforce(self) -> None:
        jobs = [job for job in self.registry.all() if job.gone_at is None]
        directives, caps = decide(self._rules, self._states, jobs, outputs(self._holds),
                                  self._power_ranges())
        for job in jobs:
            self._apply(job, directives[job.id])
        if self._power is not None:
            try:
                applied = self._power.apply(caps)
                self._power_error = None
            except Exception as exc:
                if self._power_error != repr(exc):
                    log.exception("the power caps could not be applied")
                self._power_error, applied = repr(exc), []
            for action, gpu, cap in applied:
                previous = self._caps.get(gpu)
                if self._retuned_cap(action, previous, cap):
                    continue
                rules = cap.rules if cap is not None else (
                    previous.rules if previous is not None else ("unknown",))
                self._count(action, rules)
                power_line(action, gpu, rules, cap)
                self._events.power(action, gpu, cap, previous, config=self._rules,
                                   states=self._states, round_=self._round)
        still_capped = self._power.capped if self._power is not None else {}
        self._caps = {gpu: cap for gpu, cap in self._caps.items() if gpu in still_capped}
        self._caps.update({cap.gpu: cap for cap in caps.values()})
        self._publish()

    def _apply(self, job: Job, directive: Directive) -> None:
        """Bring one job to its directive. Whatever its actuator raises is this job's
        problem alone (reported on the job, logged once): the other jobs and the power
        caps of the round are enforced all the same."""
        before = job.directive
        try:
            self._actuators[job.mode].apply(job, directive)
            job.extra.pop("error", None)
        except ActuatorError as exc:
            if job.extra.get("error") != str(exc):
                log.warning("job %s (%s): %s", job.id, job.name, exc)
            job.extra["error"] = str(exc)
        except Exception as exc:
            error = f"its {job.mode.value} actuator failed: {exc!r}"
            if job.extra.get("error") != error:
                log.exception("job %s (%s): %s", job.id, job.name, error)
            job.extra["error"] = error
        if directive == before:
            return
        job.directive = directive
        job.directive_version += 1
        if not directive.same_hold(before) and not self._retuned(before, directive):
            action = {Action.PAUSE: "pause", Action.SLOW: "slow", Action.RUN: "resume"}[
                directive.action]
            rules = directive.rules if directive.action is not Action.RUN else before.rules
            self._count(action, rules)
            by = [self._operator.get(job.id, "operator") if r == OPERATOR else f"rule {r}"
                  for r in rules]
            action_line(action, job, by=", ".join(by), directive=directive)
            self._events.action(action, ", ".join(by), job, before, rules,
                                config=self._rules, states=self._states, round_=self._round)
        self._notify(job)

    def _detach(self, job: Job) -> None:
        """Let a job go; an actuator that fails is logged, and the job forgotten all the
        same (what it still holds is in the journal, for the guardian and release-all)."""
        try:
            self._actuators[job.mode].detach(job)
        except Exception:
            log.exception("job %s (%s): could not release it", job.id, job.name)

    def _hold_rules(self) -> set[str]:
        return {rule.name for rule in self._rules if rule.holds}

    def _retuned(self, before: Directive, after: Directive) -> bool:
        """A hold rule's loop moved the speed of a job it already slowed (the same rules
        hold it): the directive changes, but it is no new action to count or audit, or
        a loop settling would write an event every round."""
        return (before.action is Action.SLOW and after.action is Action.SLOW
                and before.rules == after.rules
                and bool(self._hold_rules() & set(after.rules)))

    def _retuned_cap(self, action: str, previous: PowerCap | None,
                     cap: PowerCap | None) -> bool:
        """As _retuned, for a power limit a hold rule's loop moved (journalled all the
        same, by PowerCapper, before it changed)."""
        return (action == "power_cap" and previous is not None and cap is not None
                and previous.rules == cap.rules and bool(self._hold_rules() & set(cap.rules)))

    def _ref(self, job_id: str) -> dict[str, Any]:
        """The job as an audit event names it; just the id asked for if there is none."""
        try:
            return job_ref(self.registry.get(job_id))
        except NoSuchJob:
            return {"id": job_id, "name": None, "pid": None, "mode": None}

    def _count(self, action: str, rules: tuple[str, ...]) -> None:
        for rule in rules or ("operator",):
            self._on_action(action, rule)

    def _notify(self, job: Job) -> None:
        """Tell the listeners once the view holds the change (see _publish)."""
        self._changed[job.id] = job.directive_version

    def _watch_exit(self, job: Job) -> None:
        if job.pid is not None and job.pid_started_at is not None:
            self._exits.watch(job.id, process.ProcessIdentity(job.pid, job.pid_started_at))

    def _hear_from(self, job: Job) -> None:
        """Start the expiry clock of a job that only its polls show to be alive: a
        cooperative job with no process, which no scheduler's source unregisters."""
        if job.mode is Mode.COOPERATIVE and job.pid is None and job.scheduler_id is None:
            self._heard[job.id] = self._clock()

    def _expire_unheard(self) -> None:
        """Unregister the cooperative jobs with no process that stopped polling: nothing
        else would ever tell that they are gone."""
        if not self._expire_after:
            return
        now = self._clock()
        for job_id, heard in list(self._heard.items()):
            if now - heard < self._expire_after:
                continue
            self._heard.pop(job_id, None)
            job = self.registry.remove(job_id)
            if job is None:
                continue
            self._detach(job)
            if job.directive.action is not Action.RUN:
                self._count("resume", job.directive.rules)
            self._journal.drop_job(job.id)
            self._operator.pop(job.id, None)
            job.directive = RUN
            job.directive_version += 1
            action_line("expire", job, by="governor")
            self._events.emit("unregister", "governor", job, reasons=[
                f"no directive poll for {format_duration(self._expire_after)} "
                "(jobs.cooperative_expire_after)"], round_=self._round)
            self._notify(job)

    def _notice_gone(self) -> None:
        """Jobs whose process exited are released and marked gone; forgotten later."""
        now = self._wall()
        exited = self._exits.exited()
        for job in self.registry.all():
            if job.gone_at is not None:
                if now - job.gone_at >= self._forget_after:
                    self.registry.remove(job.id)
                continue
            if job.id not in exited:
                continue
            self._exits.forget(job.id)
            self._detach(job)
            if job.directive.action is not Action.RUN:
                self._count("resume", job.directive.rules)
            job.gone_at = now
            job.directive = RUN
            job.directive_version += 1
            self._journal.drop_job(job.id)
            action_line("gone", job, by="exit")
            self._events.emit("gone", "governor", job, reasons=["its process exited"],
                               round_=self._round)
            self._notify(job)

    def _bind_devices(self, snapshot: Snapshot) -> None:
        """Jobs registered without devices are bound to the GPUs NVML lists them on."""
        gpu_pids = {gpu: pids for gpu, pids in snapshot.gpu_pids.items() if pids}
        for job in self.registry.all():
            if job.devices or job.gone_at is not None:
                continue
            bound: frozenset[str] = frozenset()
            if gpu_pids and job.pid is not None and job.pid_started_at is not None:
                tree = {p.pid for p in process.tree(
                    process.ProcessIdentity(job.pid, job.pid_started_at))}
                bound = frozenset(f"gpu{gpu}" for gpu, pids in gpu_pids.items() if pids & tree)
            if bound != job.auto_devices:
                log.info("job %s (%s): bound to %s by NVML's process list", job.id, job.name,
                         ", ".join(sorted(bound)) or "no GPU")
                job.auto_devices = bound

    def _log_transition(self, t: Transition) -> None:
        rule = next((r for r in self._rules if r.name == t.rule), None)
        series = series_of(rule, t.labels) if rule else t.rule
        value = "missing" if t.value is None else f"{t.value:g}"
        level = logging.INFO if t.after in (Phase.TRIPPED, Phase.OK) else logging.DEBUG
        log.log(level, "rule %s: %s %s -> %s (value %s)", t.rule, series, t.before.value,
                t.after.value, value)

    def _warn_unenforceable(self) -> None:
        if self._power_unavailable is None:
            return
        for rule in self._rules:
            if rule.action == "power_cap" or (rule.holds and rule.via == "power_limit"):
                log.warning("rule %s (%s) is not enforceable: %s", rule.name,
                            rule.action, self._power_unavailable)

    def _rules_view(self) -> Callable[[], list[dict[str, Any]]]:
        """What /v1/rules will say of this moment, made when first read."""
        rules, states, holds = list(self._rules), self._states, outputs(self._holds)
        offset, unavailable = self._wall() - self._clock(), self._power_unavailable

        def make() -> list[dict[str, Any]]:
            view = rule_states_view(rules, states, offset, holds)
            by_name = {r.name: r for r in rules}
            for entry in view:
                rule = by_name[str(entry["name"])]
                if rule.action == "power_cap" or (rule.holds and rule.via == "power_limit"):
                    entry["enforceable"] = unavailable is None
                    if unavailable is not None:
                        entry["not_enforceable_because"] = unavailable
            return view

        return make

    def _publish(self) -> None:
        rules = LazyRules(self._rules_view())
        jobs = []
        directives: dict[str, DirectiveView] = {}
        held_by: dict[str, tuple[str, ...]] = {}
        for job in self.registry.all():
            jobs.append(JobView.of(job))
            directives[job.id] = DirectiveView(job.directive, job.directive_version)
            held_by[job.id] = job.directive.rules
        caps = self._power.capped if self._power is not None else {}
        self.view = ControlView(tuple(jobs), rules, directives, caps, held_by)
        changed, self._changed = self._changed, {}
        for job_id, version in changed.items():
            for listener in self._listeners:
                try:
                    listener(job_id, version)
                except Exception:
                    log.exception("directive listener failed")

    @property
    def power_caps(self) -> dict[str, float]:
        return dict(self.view.power_caps)


def _refusal(exc: ActuatorError) -> RegistrationError:
    """A registration refused because the actuator cannot hold the job."""
    if isinstance(exc, ProtectedProcessError):
        return NotPermitted(str(exc))
    return Unacceptable(str(exc))
