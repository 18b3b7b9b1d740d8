"""The sampling loop: a fixed cadence, overruns counted and not stacked, health."""

from __future__ import annotations

import threading
import time

import pytest

from governor.sampling.base import SampleResult
from governor.sampling.runner import SamplerRunner
from governor.service.loop import SamplingLoop
from governor.service.metrics import DaemonMetrics
from governor.snapshot import SnapshotStore, reading


class Slow:
    """Takes `delay` seconds per round."""

    name = "slow"

    def __init__(self, delay: float):
        self.delay = delay
        self.calls = 0

    def sample(self) -> SampleResult:
        self.calls += 1
        time.sleep(self.delay)
        return SampleResult([reading("memory_used_ratio", 0.5)])

    def close(self) -> None:
        pass


def make_loop(sampler: Slow, interval: float) -> SamplingLoop:
    store = SnapshotStore()
    runner = SamplerRunner([sampler], timeout=10.0)
    return SamplingLoop(runner, store, DaemonMetrics(store), interval)


def test_overrunning_rounds_are_counted_and_not_stacked() -> None:
    sampler = Slow(0.25)
    loop = make_loop(sampler, interval=0.1)
    loop.start()
    time.sleep(1.3)
    loop.stop()
    # each round overran: every one was counted, and the loop never ran two at once
    assert loop.overruns >= loop.rounds - 1 >= 2
    assert sampler.calls == loop.rounds


def test_health_follows_the_cadence() -> None:
    clock_now = [100.0]
    store = SnapshotStore()
    loop = SamplingLoop(SamplerRunner([Slow(0)], timeout=1.0), store, DaemonMetrics(store), 1.0,
                        clock=lambda: clock_now[0])
    ok, why = loop.health()
    assert not ok and "starting" in why
    loop.run_once()
    assert loop.health() == (True, "ok")
    clock_now[0] += 2.9
    assert loop.health()[0]
    clock_now[0] += 0.2
    ok, why = loop.health()
    assert not ok and why == "no sampling round has completed for 3.1 s"


def test_hooks_see_every_snapshot_and_a_failing_hook_does_not_stop_the_loop() -> None:
    loop = make_loop(Slow(0), interval=0.05)
    seen: list[int] = []
    done = threading.Event()

    def failing(_: object) -> None:
        raise RuntimeError("boom")

    def record(snapshot: object) -> None:
        seen.append(snapshot.sequence)  # type: ignore[attr-defined]
        if len(seen) >= 3:
            done.set()

    loop.add_hook(failing)
    loop.add_hook(record)
    loop.start()
    assert done.wait(10)
    loop.stop()
    assert seen[:3] == [1, 2, 3]
    assert loop.store.latest is not None


def test_lateness_is_measured_against_the_tick_and_late_rounds_counted() -> None:
    clock_now = [100.0]
    store = SnapshotStore()
    metrics = DaemonMetrics(store)
    loop = SamplingLoop(SamplerRunner([Slow(0)], timeout=1.0), store, metrics, 1.0,
                        clock=lambda: clock_now[0])
    loop.run_once(due=100.0)
    assert (loop.last_lateness, loop.late_rounds) == (0.0, 0)
    clock_now[0] = 101.5  # exactly half an interval: not late yet
    loop.run_once(due=101.0)
    assert (loop.last_lateness, loop.late_rounds) == (0.5, 0)
    clock_now[0] = 102.75
    loop.run_once(due=102.0)
    assert (loop.last_lateness, loop.late_rounds) == (0.75, 1)
    text = metrics.render().decode()
    assert "governor_round_lateness_seconds 0.75" in text
    assert "governor_rounds_late_total 1.0" in text
    loop.run_once()  # a round outside the grid (tests, `governor sample`) is never late
    assert loop.last_lateness == 0.0


class LateWakeups:
    """Stands in for the loop's stop event: every wait returns `late` seconds after its
    timeout on the fake clock, as a thread starved of CPU wakes late."""

    def __init__(self, clock_now: list[float], late: float):
        self.clock_now = clock_now
        self.late = late
        self.flag = False

    def wait(self, timeout: float) -> bool:
        self.clock_now[0] += timeout + self.late
        return self.flag

    def is_set(self) -> bool:
        return self.flag

    def set(self) -> None:
        self.flag = True


@pytest.mark.parametrize(("late", "counted"), [(0.25, 0), (0.75, 3)])
def test_the_loop_measures_each_round_against_its_tick(late: float, counted: int) -> None:
    clock_now = [100.0]
    store = SnapshotStore()
    loop = SamplingLoop(SamplerRunner([Slow(0)], timeout=1.0), store, DaemonMetrics(store),
                        1.0, clock=lambda: clock_now[0])
    wakeups = LateWakeups(clock_now, late)
    loop._stop = wakeups  # type: ignore[assignment]

    def stop_after_four(_: object) -> None:
        if loop.rounds == 3:  # the hook runs before the round is counted
            wakeups.set()

    loop.add_hook(stop_after_four)
    loop._run()
    assert loop.rounds == 4
    assert loop.last_lateness == late, "the first round is on time, the others late"
    assert (loop.late_rounds, loop.overruns) == (counted, 0)


def test_late_rounds_are_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    clock_now = [100.0]
    store = SnapshotStore()
    loop = SamplingLoop(SamplerRunner([Slow(0)], timeout=1.0), store, DaemonMetrics(store),
                        1.0, clock=lambda: clock_now[0])
    with caplog.at_level("WARNING", logger="governor.service.loop"):
        for second in (0, 10, 61):
            clock_now[0] = 100.0 + second + 0.8
            loop.run_once(due=100.0 + second)
    assert loop.late_rounds == 3
    assert [r.getMessage() for r in caplog.records] == [
        "a sampling round started 0.80 s late (interval 1 s): governor is short of CPU; "
        "1 late round(s) so far",
        "a sampling round started 0.80 s late (interval 1 s): governor is short of CPU; "
        "3 late round(s) so far",
    ]
