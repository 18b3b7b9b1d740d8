"""The round runner: no sampler can take the round down, a hung one is not stacked."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from governor.sampling.base import SampleResult, SamplerUnavailable
from governor.sampling.runner import SamplerRunner
from governor.snapshot import SamplerState, reading


class Fixed:
    def __init__(self, name: str, *readings: float):
        self.name = name
        self.values = readings
        self.closed = False

    def sample(self) -> SampleResult:
        return SampleResult([reading("memory_used_ratio", v) for v in self.values])

    def close(self) -> None:
        self.closed = True


class Raises:
    name = "broken"

    def __init__(self, exc: Exception):
        self.exc = exc

    def sample(self) -> SampleResult:
        raise self.exc

    def close(self) -> None:
        pass


class Hangs:
    """Blocks in sample() until released, as a sysfs read stuck in a driver."""

    name = "stuck"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def sample(self) -> SampleResult:
        self.calls += 1
        self.release.wait(30)
        return SampleResult([reading("load_average_tasks", 1.0, window="1m")])

    def close(self) -> None:
        pass


def health(snapshot: object, name: str) -> object:
    return next(h for h in snapshot.samplers if h.name == name)  # type: ignore[attr-defined]


def test_a_sampler_that_raises_is_down_and_the_others_report() -> None:
    runner = SamplerRunner([Raises(OSError("EIO")), Fixed("good", 0.5)], timeout=1.0)
    snapshot = runner.run_round()
    assert [r.value for r in snapshot.readings] == [0.5]
    bad = health(snapshot, "broken")
    assert bad.state is SamplerState.ERROR and bad.error == "OSError: EIO"
    assert health(snapshot, "good").state is SamplerState.OK
    runner.close()


def test_unavailable_is_not_an_error() -> None:
    runner = SamplerRunner([Raises(SamplerUnavailable("no GPU here"))], timeout=1.0)
    h = health(runner.run_round(), "broken")
    assert h.state is SamplerState.UNAVAILABLE and h.error == "no GPU here"
    runner.close()


def test_a_hung_sampler_times_out_and_is_not_called_again_until_it_returns() -> None:
    stuck = Hangs()
    runner = SamplerRunner([stuck, Fixed("good", 0.5)], timeout=0.2)
    first = runner.run_round()
    assert health(first, "stuck").error == "timed out after 0.2 s"
    assert [r.value for r in first.readings] == [0.5]
    second = runner.run_round()
    assert "still stuck" in health(second, "stuck").error
    assert [r.value for r in second.readings] == [0.5]
    assert stuck.calls == 1, "a stuck sampler's calls do not pile up"
    stuck.release.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        third = runner.run_round()
        if health(third, "stuck").state is SamplerState.OK:
            break
        time.sleep(0.01)  # let the worker thread see the released call return
    assert stuck.calls == 2
    assert {r.metric for r in third.readings} == {"memory_used_ratio", "load_average_tasks"}
    runner.close()


def test_duplicate_series_are_dropped_and_reported() -> None:
    runner = SamplerRunner([Fixed("twice", 0.1, 0.2)], timeout=1.0)
    snapshot = runner.run_round()
    assert [r.value for r in snapshot.readings] == [0.1]
    assert health(snapshot, "twice").problems == ("duplicate series memory_used_ratio dropped",)
    runner.close()


def test_snapshots_are_numbered_and_remember_the_last_success() -> None:
    runner = SamplerRunner([Fixed("good", 0.5)], timeout=1.0)
    a, b = runner.run_round(), runner.run_round()
    assert (a.sequence, b.sequence) == (1, 2)
    assert health(b, "good").last_success == b.taken_at
    runner.close()


def test_close_closes_the_samplers() -> None:
    sampler = Fixed("good", 0.5)
    runner = SamplerRunner([sampler], timeout=1.0)
    runner.run_round()
    runner.close()
    assert sampler.closed


def test_state_changes_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    runner = SamplerRunner([Raises(SamplerUnavailable("no GPU here"))], timeout=1.0)
    with caplog.at_level("INFO"):
        for _ in range(3):
            runner.run_round()
    assert [r.getMessage() for r in caplog.records] == ["broken: not available: no GPU here"]
    runner.close()


class Flaky:
    """Fails while `failing` is set; counts its calls."""

    name = "flaky"

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0

    def sample(self) -> SampleResult:
        self.calls += 1
        if self.failing:
            raise OSError(f"EIO on call {self.calls}")
        return SampleResult([reading("memory_used_ratio", 0.5)])

    def close(self) -> None:
        pass


class FakeClock:
    """A monotonic clock that the test moves by hand, one interval per round."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_failing_sampler_backs_off_doubling_up_to_30_s() -> None:
    clock = FakeClock()
    flaky = Flaky()
    runner = SamplerRunner([flaky, Fixed("good", 0.5)], timeout=0.8, interval=1.0,
                           clock=clock, wall=lambda: clock.now - 900.0)
    called_at: list[int] = []
    for second in range(120):
        calls = flaky.calls
        snapshot = runner.run_round()
        if flaky.calls > calls:
            called_at.append(second)
        assert health(snapshot, "flaky").state is SamplerState.ERROR
        assert health(snapshot, "good").state is SamplerState.OK, "the others keep reporting"
        clock.now += 1.0
    # after the k-th failure in a row it sits out min(1 s * 2**(k-1), 30 s) of rounds
    gaps = [b - a for a, b in itertools.pairwise(called_at)]
    assert gaps[:6] == [2, 3, 5, 9, 17, 31]
    assert set(gaps[5:]) == {31}, "the backoff stops growing at 30 s"
    runner.close()


def test_while_backing_off_the_error_says_how_often_when_and_why() -> None:
    clock = FakeClock()
    flaky = Flaky()
    runner = SamplerRunner([flaky], timeout=0.8, interval=1.0, clock=clock,
                           wall=lambda: clock.now - 900.0)
    first = health(runner.run_round(), "flaky")
    assert first.error == "OSError: EIO on call 1"
    assert (first.failures, first.retry_at) == (1, 102.0)
    clock.now += 1.0
    skipped = health(runner.run_round(), "flaky")
    assert skipped.state is SamplerState.ERROR
    assert skipped.error == ("failed 1 time in a row; next try in 1.0 s; "
                             "last error: OSError: EIO on call 1")
    assert (skipped.failures, skipped.retry_at) == (1, 102.0)
    assert skipped.as_dict()["consecutive_failures"] == 1
    assert flaky.calls == 1
    clock.now += 1.0
    second = health(runner.run_round(), "flaky")
    assert second.error == "OSError: EIO on call 2" and second.failures == 2
    clock.now += 1.0
    skipped = health(runner.run_round(), "flaky")
    assert skipped.error == ("failed 2 times in a row; next try in 2.0 s; "
                             "last error: OSError: EIO on call 2")
    runner.close()


def test_a_success_resets_the_backoff() -> None:
    clock = FakeClock()
    flaky = Flaky()
    runner = SamplerRunner([flaky], timeout=0.8, interval=1.0, clock=clock)
    for _ in range(12):  # three failures: it now sits out 4 s
        runner.run_round()
        clock.now += 1.0
    assert flaky.calls == 4
    flaky.failing = False
    while flaky.calls == 4:
        runner.run_round()
        clock.now += 1.0
    calls = flaky.calls
    for _ in range(5):
        h = health(runner.run_round(), "flaky")
        assert h.state is SamplerState.OK and h.failures == 0 and h.retry_at is None
        clock.now += 1.0
    assert flaky.calls == calls + 5, "called every round again"
    flaky.failing = True
    runner.run_round()
    clock.now += 1.0
    assert "failed 1 time in a row" in str(health(runner.run_round(), "flaky").error), (
        "a failure after a success starts the backoff from the first step")
    runner.close()


def test_a_round_a_little_early_or_late_does_not_shift_the_backoff() -> None:
    clock = FakeClock()
    flaky = Flaky()
    runner = SamplerRunner([flaky], timeout=0.8, interval=1.0, clock=clock)
    runner.run_round()
    for jitter in (-0.2, 0.3):  # the skipped round, then the retry, off their ticks
        clock.now += 1.0 + jitter
        runner.run_round()
        clock.now -= jitter
    assert flaky.calls == 2
    runner.close()


def test_unavailable_is_not_a_failure_and_does_not_back_off() -> None:
    clock = FakeClock()
    absent = Raises(SamplerUnavailable("no GPU here"))
    runner = SamplerRunner([absent], timeout=0.8, interval=1.0, clock=clock)
    for _ in range(3):
        h = health(runner.run_round(), "broken")
        assert h.state is SamplerState.UNAVAILABLE and h.failures == 0
        clock.now += 1.0
    runner.close()


def test_a_hung_sampler_is_not_backed_off_but_waited_for() -> None:
    stuck = Hangs()
    runner = SamplerRunner([stuck], timeout=0.1, interval=0.2)
    assert health(runner.run_round(), "stuck").error == "timed out after 0.1 s"
    h = health(runner.run_round(), "stuck")
    assert "still stuck" in str(h.error) and h.failures == 0
    stuck.release.set()
    deadline = time.monotonic() + 10
    while health(runner.run_round(), "stuck").state is not SamplerState.OK:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    runner.close()
