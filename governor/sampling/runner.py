"""Runs every sampler once per round and assembles the round's `Snapshot`.

The samplers run one after another on a worker thread, each with a deadline. A sampler
that raises is marked down and backs off: after k failures in a row it sits out
min(interval * 2**(k-1), 30 s) of rounds, so a broken driver is not hammered every
round, and a success resets it. One that overruns its deadline (a sysfs read stuck in a driver)
is marked down and not called again until the stuck call returns, so hung calls never
pile up and never hold the round or the other samplers.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from types import MappingProxyType

from governor.sampling.base import Sampler, SampleResult, SamplerUnavailable
from governor.snapshot import Reading, SamplerHealth, SamplerState, Snapshot

log = logging.getLogger(__name__)

#: the longest a failing sampler sits out before it is tried again
BACKOFF_MAX = 30.0


class _Worker:
    """One daemon thread that runs the calls given to it, in order.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so a read stuck
    in a driver would keep the daemon from exiting.
    """

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue[tuple[Callable[[], object], Future[object]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def submit(self, fn: Callable[[], object]) -> Future[object]:
        future: Future[object] = Future()
        self._calls.put((fn, future))
        return future

    def stop(self) -> None:
        self._calls.put(None)


@dataclass
class _Slot:
    sampler: Sampler
    #: the call still running from an earlier round, if it overran
    stuck: Future[object] | None = None
    stuck_since: float = 0.0
    last_success: float | None = None
    #: (state, error) last logged, so a state is logged once when it begins
    logged: tuple[SamplerState, str | None] | None = None
    #: calls in a row that raised; 0 after a success
    failures: int = 0
    #: monotonic start of the round in which a failing sampler is tried again
    retry_at: float = 0.0
    #: the error of the last failed call, for the rounds it sits out
    last_error: str | None = None


class SamplerRunner:
    def __init__(
        self,
        samplers: Sequence[Sampler],
        timeout: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        interval: float | None = None,
    ):
        self._slots = [_Slot(s) for s in samplers]
        #: runs each round's calls one after another; replaced when a call hangs in it
        self._worker = _Worker("samplers")
        self._workers_left_behind = 0
        self.timeout = timeout
        #: the loop's interval: the first step of a failing sampler's backoff
        self.interval = interval if interval is not None else timeout
        self._clock = clock
        self._wall = wall
        self._sequence = 0
        self._lock = threading.Lock()

    @property
    def samplers(self) -> list[Sampler]:
        return [slot.sampler for slot in self._slots]

    def run_round(self) -> Snapshot:
        with self._lock:
            return self._run_round()

    def _submit(self, slot: _Slot, started: float) -> Future[object] | None:
        """Queue the sampler's call on the worker; None when it is stuck or backing off."""
        if slot.stuck is not None and not slot.stuck.done():
            return None
        slot.stuck = None
        if self._backing_off(slot, started):
            return None
        return self._worker.submit(self._timed(slot.sampler))

    def _leave_behind(self, futures: list[Future[object] | None], after: int) -> None:
        """A call hangs in the worker: the calls queued behind it move to a new worker,
        and the old one ends once the hung call returns."""
        old, self._worker = self._worker, _Worker("samplers")
        self._workers_left_behind += 1
        old.stop()
        for k in range(after + 1, len(futures)):
            future = futures[k]
            if future is not None and future.cancel():
                futures[k] = self._worker.submit(self._timed(self._slots[k].sampler))

    def _run_round(self) -> Snapshot:
        """The samplers run one after another on one worker thread: a round wakes two
        threads, not one per sampler, and no sampler competes with another for the GIL
        (a thread per sampler, all at once, cost 1-2 ms more CPU per round on two cores).
        A call that overruns its deadline is left behind with its thread."""
        self._sequence += 1
        started, started_wall = self._clock(), self._wall()
        deadline = started + self.timeout
        #: however late the round, each sampler gets this long before it counts as stuck
        least = self.timeout / max(1, len(self._slots)) / 2
        readings: dict[tuple[str, tuple[tuple[str, str], ...]], Reading] = {}
        health: list[SamplerHealth] = []
        gpu_pids: dict[str, frozenset[int]] = {}
        futures = [self._submit(slot, started) for slot in self._slots]
        self._await_last(futures, deadline)
        for k, slot in enumerate(self._slots):
            own_deadline = max(deadline, self._clock() + least)
            state, result, error, duration = self._collect(slot, futures[k], own_deadline,
                                                           started)
            if slot.stuck is not None and slot.stuck is futures[k]:
                self._leave_behind(futures, k)
            problems: list[str] = []
            if result is not None:
                problems = list(result.problems)
                gpu_pids.update(result.gpu_pids)
                for r in result.readings:
                    key = (r.metric, r.labels)
                    if key in readings:
                        problems.append(f"duplicate series {r.series()} dropped")
                        continue
                    readings[key] = r
            if state is SamplerState.OK:
                slot.last_success = started_wall
            h = SamplerHealth(
                name=slot.sampler.name,
                state=state,
                duration_seconds=duration,
                error=error,
                problems=tuple(problems),
                last_success=slot.last_success,
                failures=slot.failures,
                retry_at=self._retry_wall(slot, started, started_wall),
            )
            self._log_transition(slot, h)
            health.append(h)

        return Snapshot(
            sequence=self._sequence,
            taken_at=started_wall,
            monotonic=started,
            readings=tuple(readings.values()),
            samplers=tuple(health),
            gpu_pids=MappingProxyType(gpu_pids),
        )

    def _await_last(self, futures: list[Future[object] | None], deadline: float) -> None:
        """Wait for the round's last call, up to the deadline. The worker runs the calls
        in order, so once it is done, all are, and the loop thread wakes once per round
        instead of once per sampler (each wake-up is a GIL hand-over between the two
        threads). If it is not done by then, the per-call deadlines below take over."""
        last = next((f for f in reversed(futures) if f is not None), None)
        if last is None:
            return
        with contextlib.suppress(FutureTimeout, CancelledError):
            last.exception(timeout=max(0.0, deadline - self._clock()))

    def _timed(self, sampler: Sampler) -> Callable[[], object]:
        """The sampler's call, returning (result or exception, seconds it took)."""
        clock = self._clock

        def call() -> tuple[SampleResult | Exception, float]:
            began = clock()
            try:
                outcome: SampleResult | Exception = sampler.sample()
            except Exception as exc:
                outcome = exc
            return outcome, clock() - began

        return call

    def _backing_off(self, slot: _Slot, now: float) -> bool:
        """Whether a failing sampler sits this round out.

        `retry_at` is the nominal start of the round that tries again; half an interval
        of slack keeps a round that starts a little early or late on the right side.
        """
        return slot.failures > 0 and now < slot.retry_at - self.interval / 2

    def _retry_wall(self, slot: _Slot, started: float, started_wall: float) -> float | None:
        if slot.failures == 0:
            return None
        return started_wall + max(0.0, slot.retry_at - started)

    def _collect(
        self, slot: _Slot, future: Future[object] | None, deadline: float, started: float
    ) -> tuple[SamplerState, SampleResult | None, str | None, float]:
        if future is None and slot.stuck is not None:
            stuck_for = self._clock() - slot.stuck_since
            return SamplerState.ERROR, None, (
                f"still stuck in a read that began {stuck_for:.1f} s ago"
            ), stuck_for
        if future is None:
            return SamplerState.ERROR, None, (
                f"failed {slot.failures} time{'s' if slot.failures > 1 else ''} in a row; "
                f"next try in {max(0.0, slot.retry_at - started):.1f} s; "
                f"last error: {slot.last_error}"
            ), 0.0
        try:
            done = future.result(timeout=max(0.0, deadline - self._clock()))
        except FutureTimeout:
            slot.stuck = future
            slot.stuck_since = self._clock() - self.timeout
            return SamplerState.ERROR, None, f"timed out after {self.timeout:g} s", self.timeout
        assert isinstance(done, tuple)
        outcome, duration = done
        if isinstance(outcome, Exception) and not isinstance(outcome, SamplerUnavailable):
            error = f"{type(outcome).__name__}: {outcome}"
            self._failed(slot, error, started)
            return SamplerState.ERROR, None, error, duration
        slot.failures, slot.last_error = 0, None
        if isinstance(outcome, SamplerUnavailable):
            return SamplerState.UNAVAILABLE, None, str(outcome), duration
        assert isinstance(outcome, SampleResult)
        return SamplerState.OK, outcome, None, duration

    def _failed(self, slot: _Slot, error: str, started: float) -> None:
        """Back off: after k failures in a row, sit out min(interval * 2**(k-1), 30 s)."""
        slot.failures += 1
        slot.last_error = error
        sit_out = min(self.interval * 2 ** min(slot.failures - 1, 30), BACKOFF_MAX)
        slot.retry_at = started + self.interval + sit_out
        log.debug("%s: failed %d time(s) in a row; next try in %.1f s", slot.sampler.name,
                  slot.failures, slot.retry_at - started)

    def _log_transition(self, slot: _Slot, health: SamplerHealth) -> None:
        key = (health.state, health.error if health.state is not SamplerState.ERROR else None)
        if slot.logged == key:
            return
        first = slot.logged is None
        slot.logged = key
        name = health.name
        if health.state is SamplerState.UNAVAILABLE:
            log.info("%s: not available: %s", name, health.error)
        elif health.state is SamplerState.ERROR:
            log.warning("%s: failed: %s", name, health.error)
        elif not first:
            log.info("%s: working again", name)

    def close(self, timeout: float = 1.0) -> None:
        """Close each sampler on the worker, after its last call; skip the stuck ones."""
        closing = []
        for slot in self._slots:
            if slot.stuck is None or slot.stuck.done():
                closing.append((slot, self._worker.submit(slot.sampler.close)))
        self._worker.stop()
        for slot, future in closing:
            try:
                future.result(timeout=timeout)
            except Exception as exc:
                log.debug("closing %s: %s", slot.sampler.name, exc)
