"""The sampling loop: one round per interval, on a thread of its own.

Rounds are scheduled on a fixed grid of the interval. A round that overruns is counted
and the grid points it overlapped are skipped, never stacked, so a slow sensor cannot
build a backlog. A round that starts late against its tick (the daemon starved of CPU, a
busy API holding the interpreter) is measured and counted, so load on the API that delays
the policy shows in the metrics. The loop's cadence is what /healthz reports.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from governor.sampling.runner import SamplerRunner
from governor.service.metrics import DaemonMetrics
from governor.snapshot import SamplerState, Snapshot, SnapshotStore

log = logging.getLogger(__name__)

RoundHook = Callable[[Snapshot], None]


class SamplingLoop:
    def __init__(
        self,
        runner: SamplerRunner,
        store: SnapshotStore,
        metrics: DaemonMetrics,
        interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.runner = runner
        self.store = store
        self.metrics = metrics
        self.interval = interval
        self._clock = clock
        self._hooks: list[RoundHook] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first_round = threading.Event()
        self.rounds = 0
        self.overruns = 0
        #: rounds that started more than half an interval after their tick
        self.late_rounds = 0
        #: how late the last round started against its tick, in seconds
        self.last_lateness = 0.0
        self._late_warned_at: float | None = None
        self.last_round_end: float | None = None

    def add_hook(self, hook: RoundHook) -> None:
        """Called on the loop's thread with every new snapshot (the policy, the watchdog)."""
        self._hooks.append(hook)

    @property
    def stale_after(self) -> float:
        """The loop is unhealthy when no round has ended for this long."""
        return max(3 * self.interval, 2.0)

    def health(self) -> tuple[bool, str]:
        if self.last_round_end is None:
            return False, "starting: no sampling round has completed yet"
        age = self._clock() - self.last_round_end
        if age > self.stale_after:
            return False, f"no sampling round has completed for {age:.1f} s"
        return True, "ok"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sampling-loop", daemon=True)
        self._thread.start()

    def wait_first_round(self, timeout: float) -> bool:
        return self._first_round.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self, due: float | None = None) -> Snapshot:
        """One round; `due` is its tick on the loop's grid, to measure how late it began."""
        started = self._clock()
        lateness = max(0.0, started - due) if due is not None else 0.0
        snapshot = self.runner.run_round()
        self.store.publish(snapshot)
        for health in snapshot.samplers:
            if health.state is SamplerState.ERROR:
                self.metrics.sampler_errors.labels(health.name).inc()
            if health.problems:
                self.metrics.sampler_problems.labels(health.name).inc(len(health.problems))
        for hook in self._hooks:
            try:
                hook(snapshot)
            except Exception:
                log.exception("round hook %r failed", hook)
        self.last_round_end = self._clock()
        self.rounds += 1
        self.metrics.rounds.inc()
        self.metrics.round_duration.set(self.last_round_end - started)
        self.last_lateness = lateness
        self.metrics.round_lateness.set(lateness)
        if lateness > self.interval / 2:
            self.late_rounds += 1
            self.metrics.rounds_late.inc()
            self._warn_late(lateness, started)
        self._first_round.set()
        return snapshot

    def _warn_late(self, lateness: float, now: float) -> None:
        """One warning a minute at most: a starved daemon would otherwise flood its log
        just when the machine is busiest."""
        if self._late_warned_at is not None and now - self._late_warned_at < 60.0:
            return
        self._late_warned_at = now
        log.warning("a sampling round started %.2f s late (interval %g s): governor is "
                    "short of CPU; %d late round(s) so far", lateness, self.interval,
                    self.late_rounds)

    def _run(self) -> None:
        due = self._clock()
        while not self._stop.is_set():
            self.run_once(due)
            due += self.interval
            now = self._clock()
            if now > due:
                skipped = math.floor((now - due) / self.interval) + 1
                self.overruns += 1
                self.metrics.rounds_overrun.inc()
                log.debug("round overran the interval; skipping %d tick(s)", skipped)
                due += skipped * self.interval
            self._stop.wait(max(0.0, due - self._clock()))
