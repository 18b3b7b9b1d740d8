"""The round runner: no sampler can take the round down, a hung one is not stacked."""

from __future__ import annotations

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
