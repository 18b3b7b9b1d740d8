"""Jobs that hold themselves: the client a cooperative job runs in its own process.

SIGSTOP is blunt: a stopped rank hangs every other rank of a distributed job until the
collective times out, and a pause in the middle of a checkpoint write turns into a
latency spike or a torn file. A cooperative job instead calls `job.checkpoint()` between
its steps and holds itself there, and marks what must not be interrupted with
`job.critical(...)`.

A background thread long-polls the job's directive (`GET /v1/jobs/{id}/directive`) and
carries the job's progress with each poll, at most once a second; `checkpoint()` only
reads what the thread last saw, so a step costs no round trip. If the daemon cannot be
reached, the job runs on (fail-open, logged once) or holds (fail_open=False) while the
thread keeps trying; a daemon that comes back without the job gets it registered again.

    from governor.client import Job

    with Job.register("trainer", devices=["gpu0"]) as job:
        for batch in data:
            train(batch)
            job.checkpoint()
            if step % 1000 == 0:
                with job.critical("checkpoint-write"):
                    save(model)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from governor.client.errors import ClientError
from governor.client.progress import STEP_BUCKETS, ProgressReport
from governor.client.rest import ApiClient
from governor.client.settings import ClientSettings, SettingsError

log = logging.getLogger("governor.job")

#: progress goes out with a poll at most this often, in seconds
PROGRESS_EVERY = 1.0
#: how long a poll waits for a change while the job runs: progress rides on the next one
POLL_WAIT = 1.0
#: ...and while it is paused with nothing new to report
POLL_WAIT_HELD = 30.0
#: retries of an unreachable daemon back off from the first delay to the last
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
#: what a daemon that does not say (an older one) is taken to allow
DEFAULT_MAX_DEFER = 30.0

#: called with an event name and its details; see Job.add_listener
Listener = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class Decision:
    """What every rank of a job does at a checkpoint: run on, sleep `seconds` (slow), or
    hold; while holding, rank 0 says "hold" again or "resume". Plain data, so any
    broadcast can carry it (torch.distributed.broadcast_object_list pickles it)."""

    action: Literal["run", "sleep", "hold", "resume"]
    seconds: float = 0.0


RUN_ON = Decision("run")


@dataclass(frozen=True, slots=True)
class _Directive:
    state: str
    speed: float
    reasons: tuple[str, ...]
    defer: bool
    max_defer: float
    #: the daemon's version; None before the first answer, -1 for the client's own
    version: int | None


_RUN = _Directive("run", 1.0, (), True, DEFAULT_MAX_DEFER, None)


def _unreachable(exc: ClientError) -> bool:
    """No answer, or not one the job can act on: the daemon is down, restarting, or
    failing. A 4xx is an answer."""
    return exc.status is None or exc.status >= 500


def _settings(config: ClientSettings | str | os.PathLike[str] | None) -> ClientSettings:
    """`config` as given, or read from the config file found as the CLI finds it."""
    if isinstance(config, ClientSettings):
        return config
    try:
        return ClientSettings.find(config)
    except SettingsError as exc:
        raise ClientError(str(exc)) from None


def _env_settings(settings: ClientSettings, url: str, socket: str | None) -> ClientSettings:
    """The settings, pointed at the daemon `governor launch` named in the environment."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise ClientError(f"GOVERNOR_URL={url!r} is not a URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ClientError(f"GOVERNOR_URL={url!r} is not an http(s) URL")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if parsed.scheme == "https" and not settings.tls:
        raise ClientError("GOVERNOR_URL is https, but the config found has no api.tls_cert to "
                          "verify the governor with: set GOVERNOR_CONFIG to its config")
    return settings.at(parsed.host, port, scheme=parsed.scheme, socket=socket or "")


class Job:
    """A handle on a cooperative job: the calling process, registered with the governor
    (`Job.register`) or started by `governor launch --mode cooperative` (`Job.from_env`).

    Call `checkpoint()` between steps and wrap what must not be interrupted in
    `critical(name)`; use it as a context manager, which unregisters the job on exit if
    the handle registered it. Call it from one thread: the time between its checkpoints
    is what a slow-down is measured against.
    """

    def __init__(self, client: ApiClient, poll_client: ApiClient, job_id: str | None, *,
                 name: str, devices: Sequence[str] = (), priority: int = 0,
                 owned: bool = True, fail_open: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.devices = tuple(devices)
        self.priority = priority
        self.fail_open = fail_open
        self._client = client
        self._poll_client = poll_client
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())
        self._id = job_id
        #: the handle registered the job, so it unregisters it
        self._owned = owned
        self._directive = _RUN
        self._connected = job_id is not None
        #: the daemon could not be reached since the last answer: a job it no longer
        #: knows was lost in a restart, not unregistered by an operator
        self._lost_since_answer = False
        #: an operator unregistered the job: it runs on, ungoverned
        self._released = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._listeners: list[Listener] = []
        # progress: totals since the job was registered (a new registration starts over)
        self._steps = 0
        self._step_seconds = 0.0
        self._bucket_counts = [0] * len(STEP_BUCKETS)
        self._deferrals = 0
        self._sent: ProgressReport | None = None
        self._sent_at = -math.inf
        #: steps since the handle was made, for the events (not reset at a re-registration)
        self._steps_seen = 0
        # critical sections
        self._depth = 0
        self._section: str | None = None
        self._defer_started: float | None = None
        self._defer_over = False
        # what the job last did
        self._step_clock = clock()
        #: the hold (state, speed) the job last acted on; None once it runs free again
        self._acted: tuple[str, float] | None = None
        self._speed_shown = 1.0

    # ---- making one ----------------------------------------------------------------------

    @classmethod
    def register(cls, name: str, devices: Sequence[str] = (), priority: int = 0, *,
                 config: ClientSettings | str | os.PathLike[str] | None = None,
                 fail_open: bool = True) -> Job:
        """Register the calling process as a cooperative job and return its handle.

        The daemon is found as the CLI finds it: `config` (a config file's path, or
        ClientSettings), else $GOVERNOR_CONFIG, else /etc/governor/governor.toml, ...
        If it cannot be reached, the job runs on ungoverned (or holds, with
        fail_open=False) and is registered once the daemon answers. A refusal (a 4xx)
        raises ClientError.
        """
        settings = _settings(config)
        job = cls(ApiClient(settings), ApiClient(settings), None, name=name, devices=devices,
                  priority=priority, owned=True, fail_open=fail_open)
        try:
            job._register(job._client)
        except ClientError as exc:
            if not _unreachable(exc):
                job._close_clients()
                raise
            job._lost(exc)
        job._start()
        return job

    @classmethod
    def from_env(cls, *, config: ClientSettings | str | os.PathLike[str] | None = None,
                 fail_open: bool = True) -> Job:
        """The job `governor launch --mode cooperative` registered for this process, from
        GOVERNOR_URL, GOVERNOR_JOB_ID and GOVERNOR_SOCKET. The token (needed only to
        register again after the daemon lost the job) comes from the config found as the
        CLI finds it, or $GOVERNOR_TOKEN. The launcher unregisters the job, not the
        handle."""
        job_id = os.environ.get("GOVERNOR_JOB_ID")
        url = os.environ.get("GOVERNOR_URL")
        if not job_id or not url:
            raise ClientError("GOVERNOR_JOB_ID and GOVERNOR_URL are not set: start the job "
                              "with `governor launch --mode cooperative -- CMD`, or use "
                              "Job.register()")
        settings = _env_settings(_settings(config), url, os.environ.get("GOVERNOR_SOCKET"))
        client = ApiClient(settings)
        name, devices, priority = Path(sys.argv[0]).stem or "job", (), 0
        failure: ClientError | None = None
        try:
            found = client.job(job_id)
        except ClientError as exc:
            if not _unreachable(exc):
                client.close()
                raise
            failure = exc
        else:
            name, priority = str(found["name"]), int(found["priority"])
            if found.get("devices_from") == "registration":
                devices = tuple(found["devices"])
        job = cls(client, ApiClient(settings), job_id, name=name, devices=devices,
                  priority=priority, owned=False, fail_open=fail_open)
        if failure is not None:
            job._lost(failure)
        job._start()
        return job

    # ---- what a job calls ----------------------------------------------------------------

    @property
    def id(self) -> str | None:
        """The job's id with the governor; None while it is not registered."""
        return self._id

    @property
    def directive(self) -> dict[str, Any]:
        """The directive last received: state, speed, reasons, defer, max_defer."""
        d = self._directive
        return {"state": d.state, "speed": d.speed, "reasons": list(d.reasons),
                "defer": d.defer, "max_defer": d.max_defer, "version": d.version}

    @property
    def deferrals(self) -> int:
        """Holds put off inside critical sections since the job was registered."""
        return self._deferrals

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(event, details)` on each of: registered, unreachable,
        reconnected, released, critical-enter, critical-exit, deferred, defer-expired,
        held, resumed, slowed, full-speed. It runs on the job's thread or the poller's,
        under the handle's lock: keep it short, and do not call the handle from it."""
        self._listeners.append(listener)

    def checkpoint(self, steps: int = 1) -> str:
        """Between steps: `steps` were done since the last call. Returns at once while
        the directive is "run" (or put off by a critical section); while "slow" at speed
        s, sleeps t*(1-s)/s after t seconds of steps; while "pause", blocks until the
        directive changes. Returns what it did: "run", "slowed" or "held"."""
        return self._carry_out(self._decide(steps))

    @contextlib.contextmanager
    def critical(self, name: str = "critical") -> Iterator[None]:
        """A section that no pause or slow may interrupt: one that arrives inside it is put
        off until it ends or until the directive's max_defer runs out, whichever is first
        (a directive with defer = false acts at once, at the next checkpoint). A pause
        put off is applied when the section ends. Nested sections count as one."""
        with self._section_of(name, hold_at_exit=True):
            yield

    def close(self) -> None:
        """Stop polling; unregister the job if this handle registered it."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
            job_id, owned = self._id, self._owned
        if owned and job_id is not None:
            try:
                self._client.unregister(job_id)
            except ClientError as exc:
                log.debug("job %s: unregistering %s: %s", self.name, job_id, exc)
        self._close_clients()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---- deciding, at a checkpoint -------------------------------------------------------

    def _decide(self, steps: int) -> Decision:
        """Count the steps since the last checkpoint and say what to do now."""
        if steps < 0:
            raise ValueError("steps cannot be negative")
        now = self._clock()
        with self._cond:
            elapsed = max(0.0, now - self._step_clock)
            if steps > 0:
                # a checkpoint with no step (a safe point inside a long step) leaves the
                # clock running: the next step's time, and a slow-down's sleep, cover it
                self._count(steps, elapsed)
            d = self._act_on(now)
            if self._current().state == "run":
                self._acted = None
                self._show_speed(1.0)
            if d is None:
                if steps > 0:
                    self._step_clock = now
                return RUN_ON
            self._acted = (d.state, d.speed)
            if d.state == "slow" and d.speed > 0:
                self._show_speed(d.speed)
                return Decision("sleep", elapsed * (1 - d.speed) / d.speed)
            return Decision("hold")

    def _carry_out(self, decision: Decision) -> str:
        if decision.action == "run":
            return "run"
        with self._cond:
            held = self._sleep(decision.seconds) if decision.action == "sleep" else self._hold()
            self._step_clock = self._clock()
        return "held" if held else "slowed"

    def _current(self) -> _Directive:
        """The directive in force: the daemon's, or the client's own while it is away."""
        if self._closing or self._released:
            return _RUN
        if self._connected and self._id is not None:
            return self._directive
        if self.fail_open:
            return _RUN
        return _Directive("pause", 0.0, ("the governor cannot be reached (fail_open=False)",),
                          True, self._directive.max_defer, -1)

    def _act_on(self, now: float) -> _Directive | None:
        """The directive to act on now, or None to run on: nothing holds the job, or a
        critical section puts it off. Starts, counts and logs a deferral, and ends it
        when max_defer runs out."""
        d = self._current()
        if d.state == "run":
            return None
        if self._depth == 0 or not d.defer or d.max_defer <= 0 or self._defer_over:
            return d
        if self._defer_started is None:
            if d.state == "slow" and self._acted == ("slow", d.speed):
                # a slow-down the job was already keeping: the first checkpoint after the
                # section catches up (its sleep covers the section), nothing is put off
                return None
            self._defer_started = now
            self._deferrals += 1
            log.info("job %s: putting off %s until critical section %r ends (at most %g s): "
                     "%s", self.name, _describe(d), self._section, d.max_defer,
                     "; ".join(d.reasons) or "no reason given")
            self._emit("deferred", section=self._section, state=d.state, speed=d.speed,
                       max_defer=d.max_defer)
            return None
        if now - self._defer_started < d.max_defer:
            return None
        self._defer_over = True
        log.info("job %s: critical section %r is still open after max_defer (%g s): "
                 "%s now", self.name, self._section, d.max_defer, _describe(d))
        self._emit("defer-expired", section=self._section, state=d.state)
        return d

    def _sleep(self, seconds: float) -> bool:
        """A slow-down's sleep, cut short by a change; True if it became a hold."""
        deadline = self._clock() + seconds
        while True:
            now = self._clock()
            d = self._act_on(now)
            if d is None or d.state == "run":
                return False
            if d.state == "pause":
                return self._hold()
            if now >= deadline:
                return False
            self._cond.wait(deadline - now)

    def _hold(self) -> bool:
        """Block while the directive in force is a pause; True if it was one."""
        if not self._must_hold():
            return False
        self._note_hold(True)
        while self._must_hold():
            self._cond.wait(POLL_WAIT)
        self._note_hold(False)
        return True

    def _must_hold(self) -> bool:
        d = self._act_on(self._clock())
        return d is not None and d.state == "pause"

    def _note_hold(self, holding: bool) -> None:
        if holding:
            reasons = list(self._current().reasons)
            log.info("job %s: paused by the governor: %s", self.name,
                     "; ".join(reasons) or "no reason given")
            self._emit("held", reasons=reasons)
        else:
            log.info("job %s: resumed", self.name)
            self._emit("resumed")

    def _show_speed(self, speed: float) -> None:
        if speed == self._speed_shown:
            return
        self._speed_shown = speed
        if speed < 1:
            log.info("job %s: slowed by the governor to %g%% of its time: %s", self.name,
                     speed * 100, "; ".join(self._current().reasons) or "no reason given")
            self._emit("slowed", speed=speed)
        else:
            log.info("job %s: back to full speed", self.name)
            self._emit("full-speed")

    @contextlib.contextmanager
    def _section_of(self, name: str, *, hold_at_exit: bool) -> Iterator[None]:
        """A critical section; `hold_at_exit` False leaves a pause put off to the next
        checkpoint (DistributedCheckpoint: every rank must hold at the same step)."""
        with self._cond:
            self._depth += 1
            if self._depth == 1:
                self._section = name
                self._defer_started, self._defer_over = None, False
                self._emit("critical-enter", section=name)
                self._act_on(self._clock())
        finished = False
        try:
            yield
            finished = True
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._emit("critical-exit", section=self._section)
                    self._section = None
                    self._defer_started, self._defer_over = None, False
                    if finished and hold_at_exit and self._hold():
                        self._step_clock = self._clock()

    # ---- progress ------------------------------------------------------------------------

    def _count(self, steps: int, elapsed: float) -> None:
        if steps == 0:
            return
        per_step = elapsed / steps
        index = next(i for i, bound in enumerate(STEP_BUCKETS) if per_step <= bound)
        self._bucket_counts[index] += steps
        self._steps += steps
        self._steps_seen += steps
        self._step_seconds += elapsed

    def _report(self) -> ProgressReport:
        cumulative, total = [], 0
        for count in self._bucket_counts:
            total += count
            cumulative.append(total)
        return ProgressReport(self._steps, self._step_seconds, tuple(cumulative),
                              self._deferrals)

    def _restart_progress(self) -> None:
        """A new registration: the daemon counts from zero again."""
        self._steps, self._step_seconds, self._deferrals = 0, 0.0, 0
        self._bucket_counts = [0] * len(STEP_BUCKETS)
        self._sent, self._sent_at = None, -math.inf

    # ---- the poller ----------------------------------------------------------------------

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"governor-job-{self.name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delay = BACKOFF_FIRST
        while not self._closing and not self._released:
            try:
                if self._id is None:
                    self._register(self._poll_client)
                self._poll()
            except ClientError as exc:
                if self._closing:
                    return
                if exc.status == 404 and self._id is not None:
                    self._forgotten()
                    continue
                if _unreachable(exc):
                    self._lost(exc)
                else:
                    self._refused(exc)
                self._pause_for(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            except Exception as exc:  # a bug must not leave the job ungoverned in silence
                if self._closing:
                    return
                log.exception("job %s: the governor's poller failed; trying again", self.name)
                self._lost(ClientError(str(exc)))
                self._pause_for(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_FIRST

    def _pause_for(self, seconds: float) -> None:
        with self._cond:
            if not self._closing:
                self._cond.wait(seconds)

    def _poll(self) -> None:
        now = self._clock()
        with self._cond:
            job_id, since = self._id, self._directive.version
            report = self._report()
            fresh = report != self._sent
            send = None if not fresh or now - self._sent_at < PROGRESS_EVERY else report
            if since is None:
                wait = 0.0
            elif self._directive.state == "pause" and not fresh:
                wait = POLL_WAIT_HELD
            else:
                wait = POLL_WAIT
        assert job_id is not None
        body = self._poll_client.directive(job_id, wait=wait, since=since,
                                           progress=send.as_params() if send else None)
        with self._cond:
            if job_id != self._id:
                return
            if send is not None:
                self._sent, self._sent_at = send, now
            self._answered(body)

    def _answered(self, body: dict[str, Any]) -> None:
        new = _Directive(
            state=str(body["state"]), speed=float(body["speed"]),
            reasons=tuple(str(r) for r in body.get("reasons", ())),
            defer=bool(body.get("defer", True)),
            max_defer=float(body.get("max_defer", DEFAULT_MAX_DEFER)),
            version=int(body["version"]))
        self._lost_since_answer = False
        if not self._connected:
            self._connected = True
            log.info("job %s: the governor answers again (job %s)", self.name, self._id)
            self._emit("reconnected")
            self._cond.notify_all()
        if new != self._directive:
            self._directive = new
            if self._depth > 0:
                self._act_on(self._clock())  # a hold arriving inside a section: put off
            self._cond.notify_all()

    def _register(self, client: ApiClient) -> None:
        body = client.register(self.name, pid=os.getpid(), mode="cooperative",
                               devices=list(self.devices), priority=self.priority)
        with self._cond:
            self._id, self._owned = str(body["id"]), True
            self._connected, self._lost_since_answer = True, False
            self._directive = _RUN
            self._restart_progress()
            log.info("job %s: registered with the governor as job %s", self.name, self._id)
            self._emit("registered")
            self._cond.notify_all()

    def _lost(self, exc: ClientError) -> None:
        with self._cond:
            if self._connected or not self._lost_since_answer:
                log.warning("job %s: %s; %s", self.name, exc,
                            "running on ungoverned (fail-open) and trying again quietly"
                            if self.fail_open else "holding until it answers (fail_open=False)")
                self._emit("unreachable", error=str(exc))
            self._connected = False
            self._lost_since_answer = True
            self._cond.notify_all()

    def _refused(self, exc: ClientError) -> None:
        """A 4xx the poller cannot act on (its token refused, say): said once, retried."""
        with self._cond:
            if self._connected or not self._lost_since_answer:
                log.error("job %s: the governor refused: %s (HTTP %s); trying again",
                          self.name, exc, exc.status)
            self._connected = False
            self._lost_since_answer = True
            self._cond.notify_all()

    def _forgotten(self) -> None:
        """The daemon has no such job. After an outage it restarted without it: register
        again. While it stayed up, an operator unregistered the job: let it go."""
        with self._cond:
            old, self._id = self._id, None
            if self._lost_since_answer:
                log.info("job %s: the governor came back without job %s; registering again",
                         self.name, old)
                return
            self._released = True
            log.warning("job %s: job %s was unregistered while the governor ran; running on "
                        "ungoverned", self.name, old)
            self._emit("released", old_id=old)
            self._cond.notify_all()

    def _emit(self, event: str, **details: Any) -> None:
        details = {"job": self._id, "steps": self._steps_seen, **details}
        for listener in self._listeners:
            try:
                listener(event, details)
            except Exception:
                log.exception("job %s: a listener failed on %s", self.name, event)

    def _close_clients(self) -> None:
        self._client.close()
        self._poll_client.close()

    # ---- for DistributedCheckpoint -------------------------------------------------------

    def _wait_released(self, timeout: float) -> bool:
        """Wait up to `timeout` for a pause to end; True once it has."""
        with self._cond:
            if self._must_hold():
                self._cond.wait(timeout)
            return not self._must_hold()

    def _restart_step_clock(self) -> None:
        with self._cond:
            self._step_clock = self._clock()


def _describe(d: _Directive) -> str:
    return f"a slow-down to {d.speed:g}" if d.state == "slow" else "a pause"


class DistributedCheckpoint:
    """Every rank of a distributed job holds at the same step.

    Rank 0 holds the `Job` and decides; `broadcast(obj)` is called on every rank with
    rank 0's decision (None elsewhere) and returns it on all, so the ranks sleep the same
    time or hold together, and none is left waiting in a collective for another that was
    stopped. While they hold, rank 0 broadcasts "hold" every `hold_tick` seconds until it
    sees the pause lifted, so no collective waits longer than that. With torch:

        def broadcast(obj):
            box = [obj]
            torch.distributed.broadcast_object_list(box, src=0)
            return box[0]

        sync = DistributedCheckpoint(Job.from_env() if rank == 0 else None, rank, broadcast)
        for batch in data:
            step(batch)
            sync.checkpoint()

    `every` > 1 asks (and broadcasts) at every `every`-th checkpoint only.
    """

    def __init__(self, job: Job | None, rank: int,
                 broadcast: Callable[[Decision | None], Decision], *, every: int = 1,
                 hold_tick: float = 1.0):
        if rank != 0 and job is not None:
            raise ValueError("only rank 0 holds the job; pass None on the other ranks")
        if every < 1:
            raise ValueError("every must be at least 1")
        self.job = job
        self.rank = rank
        self.every = every
        self.hold_tick = hold_tick
        self._broadcast = broadcast
        self._calls = 0
        self._steps = 0

    def checkpoint(self, steps: int = 1) -> str:
        """Between steps, on every rank: returns "run", "slowed" or "held", the same on
        every rank."""
        self._calls += 1
        self._steps += steps
        if self._calls % self.every:
            return "run"
        steps, self._steps = self._steps, 0
        mine: Decision | None = None
        if self.rank == 0:
            mine = self.job._decide(steps) if self.job is not None else RUN_ON
        decision = self._broadcast(mine)
        if decision.action == "run":
            return "run"
        if decision.action == "sleep":
            time.sleep(decision.seconds)
            if self.job is not None:
                self.job._restart_step_clock()
            return "slowed"
        self._hold_together()
        return "held"

    def critical(self, name: str = "critical") -> contextlib.AbstractContextManager[None]:
        """A critical section, entered on every rank; rank 0's job puts off what arrives
        inside it, and the ranks hold together at the next checkpoint after it."""
        if self.job is None:
            return contextlib.nullcontext()
        return self.job._section_of(name, hold_at_exit=False)

    def _hold_together(self) -> None:
        job = self.job
        if job is not None:
            with job._cond:
                job._note_hold(True)
        while True:
            mine: Decision | None = None
            if self.rank == 0:
                released = job._wait_released(self.hold_tick) if job is not None else True
                mine = Decision("resume") if released else Decision("hold")
            if self._broadcast(mine).action == "resume":
                break
        if job is not None:
            with job._cond:
                job._note_hold(False)
            job._restart_step_clock()
