"""The actuators' control laws, without root, processes or a clock: a simulated plant
(a job whose measured share answers the duty cycle or the quota) closes the loop."""

from __future__ import annotations

import itertools

import pytest

from governor.control.laws import (
    MAX_WINDOW,
    MIN_DEMAND,
    MIN_FRACTION,
    MIN_QUOTA_US,
    DutyWindow,
    QuotaState,
    job_demand,
    learn_demand,
    next_quota,
    retarget_duty,
    steer_duty,
)

WINDOW = 0.5
PERIOD_US = 100_000


def _duty_window(fraction: float, share: float, cores: float = 2.0) -> DutyWindow:
    """A window of a job using `cores` while it runs, let run `fraction` of the time but
    getting `share` of it in the end (signals that go out late, wake-up costs...)."""
    run_time = fraction * WINDOW
    return DutyWindow(WINDOW, run_time, cores * run_time, cores * share * WINDOW)


@pytest.mark.parametrize("plant", [
    pytest.param(lambda f: min(1.0, f + 0.05), id="stops-go-out-late"),
    pytest.param(lambda f: 0.7 * f, id="loses-30-percent"),
    pytest.param(lambda f: f, id="exact"),
])
def test_duty_cycle_converges_on_its_target_share(plant: object) -> None:
    assert callable(plant)
    target = 0.4
    fraction = target
    for _ in range(12):
        step = steer_duty(fraction, target, _duty_window(fraction, plant(fraction)))
        assert step.close_window and step.achieved is not None
        assert step.demand == pytest.approx(2.0)
        fraction = step.fraction
    assert plant(fraction) == pytest.approx(target, abs=0.005)


def test_a_job_that_waits_is_judged_by_its_rate_running_free() -> None:
    """A job that uses a quarter of a core running free makes up for each stop as soon as
    it runs again (1.4 times its free rate while running, say): judged by that rate, a
    speed of 0.5 would let it do 0.7 of its free work. By its rate before it was slowed,
    the duty cycle brings it to 0.5 of it."""
    free, target, fraction = 0.25, 0.5, 0.5
    for _ in range(20):
        run_time = fraction * WINDOW
        used = min(free * WINDOW, 1.4 * free * run_time)  # it cannot do more than free
        step = steer_duty(fraction, target, DutyWindow(WINDOW, run_time, used, used,
                                                       free_rate=free))
        fraction = step.fraction
    assert step.demand == pytest.approx(free)
    assert min(free, 1.4 * free * fraction) / free == pytest.approx(target, abs=0.01)


@pytest.mark.parametrize(("free", "running", "share", "demand"), [
    (None, 1.0, 0.5, 1.0),    # never seen running free: the rate while running
    (0.9, 1.0, 0.5, 0.9),     # a computing job: much the same either way, the lower
    (0.25, 1.0, 0.075, 0.25),  # a waiting job, slowed hard: bursts when let run
    (0.05, 1.0, 0.5, 1.0),    # free while starting up: slowed, it does far more now
])
def test_job_demand(free: float | None, running: float, share: float,
                    demand: float) -> None:
    """`share`: the cores the job used over the window."""
    window = DutyWindow(WINDOW, 0.2, running * 0.2, share * WINDOW, free_rate=free)
    assert job_demand(window) == pytest.approx(demand)


def test_duty_cycle_never_overshoots() -> None:
    """A gain below 1: the share approaches the target from one side."""
    target, fraction = 0.3, 0.9
    shares = []
    for _ in range(10):
        fraction = steer_duty(fraction, target, _duty_window(fraction, fraction)).fraction
        shares.append(fraction)
    assert all(a >= b >= target for a, b in itertools.pairwise(shares))


def test_duty_cycle_waits_for_an_idle_job() -> None:
    """Too little CPU says nothing: the window grows, up to MAX_WINDOW, and then starts
    over without touching the fraction."""
    idle = DutyWindow(WINDOW, 0.2, 0.001, 0.001)
    step = steer_duty(0.5, 0.3, idle)
    assert step == (0.5, False, None, None)
    long_idle = idle._replace(window=MAX_WINDOW)
    assert steer_duty(0.5, 0.3, long_idle) == (0.5, True, None, None)
    never_ran = DutyWindow(WINDOW, 0.0, 0.5, 0.5)
    assert steer_duty(0.5, 0.3, never_ran).achieved is None


def test_duty_cycle_is_clamped() -> None:
    # a job that cannot get its target even running always: the fraction stops at 1
    fraction = 0.5
    for _ in range(20):
        fraction = steer_duty(fraction, 0.9, _duty_window(fraction, 0.5 * fraction)).fraction
    assert fraction == 1.0
    # a job that gets far more than it is let run: the fraction stops at the floor
    for _ in range(20):
        fraction = steer_duty(fraction, 0.02, _duty_window(fraction, 0.2, cores=8.0)).fraction
    assert fraction == MIN_FRACTION


def test_a_new_duty_target_keeps_the_correction() -> None:
    assert retarget_duty(0.45, 0.4, 0.2) == pytest.approx(0.25)
    assert retarget_duty(0.05, 0.4, 0.1) == MIN_FRACTION
    assert retarget_duty(0.9, 0.5, 0.8) == 1.0


def _measured(quota_us: int, demand: float, efficiency: float) -> float:
    """Cores a job wanting `demand` cores uses under a quota, losing a share to
    throttling."""
    return min(demand, efficiency * quota_us / PERIOD_US)


@pytest.mark.parametrize("efficiency", [0.6, 0.8, 1.0, 1.3])
def test_quota_converges_on_its_target(efficiency: float) -> None:
    demand: float | None = None
    for rate in (2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0):
        demand = learn_demand(demand, rate)  # measured running free
    assert demand == pytest.approx(2.0)
    speed, state, slow_rate = 0.5, QuotaState(), None
    for _ in range(15):
        state = next_quota(state, speed, demand=demand, slow_rate=slow_rate,
                           period_us=PERIOD_US)
        assert state.quota_us is not None
        slow_rate = _measured(state.quota_us, 2.0, efficiency)
    assert slow_rate == pytest.approx(speed * 2.0, rel=0.01)


def test_quota_before_any_demand_is_learnt() -> None:
    """A job never seen running free is taken to want MIN_DEMAND cores."""
    state = next_quota(QuotaState(), 0.5, demand=None, slow_rate=None, period_us=PERIOD_US)
    assert state == (round(0.5 * MIN_DEMAND * PERIOD_US), 0.5)
    idle = next_quota(QuotaState(), 0.5, demand=0.01, slow_rate=None, period_us=PERIOD_US)
    assert idle == state


def test_quota_is_clamped() -> None:
    assert next_quota(QuotaState(), 0.0, demand=2.0, slow_rate=None,
                      period_us=PERIOD_US) == (MIN_QUOTA_US, 0.0)
    assert next_quota(QuotaState(), 1.7, demand=2.0, slow_rate=None,
                      period_us=PERIOD_US) == (2 * PERIOD_US, 1.0)
    # a job far below its target moves at most FEEDBACK_STEP at a time, and never past
    # its demand
    state = QuotaState(50_000, 0.5)
    grown = next_quota(state, 0.5, demand=2.0, slow_rate=0.0, period_us=PERIOD_US)
    assert grown == (100_000, 0.5)
    capped = next_quota(QuotaState(180_000, 0.5), 0.5, demand=2.0, slow_rate=0.0,
                        period_us=PERIOD_US)
    assert capped == (2 * PERIOD_US, 0.5)
    shrunk = next_quota(state, 0.5, demand=2.0, slow_rate=100.0, period_us=PERIOD_US)
    assert shrunk == (25_000, 0.5)


def test_quota_keeps_its_correction_across_speeds() -> None:
    learnt = QuotaState(80_000, 0.5)  # the job needed more than speed * demand
    assert next_quota(learnt, 0.25, demand=1.0, slow_rate=0.3,
                      period_us=PERIOD_US) == (40_000, 0.25)
    # nothing measured this round: the quota stays
    assert next_quota(learnt, 0.5, demand=2.0, slow_rate=None,
                      period_us=PERIOD_US) == learnt
    # after a quota for speed 0 a new speed starts afresh from the demand
    assert next_quota(QuotaState(MIN_QUOTA_US, 0.0), 0.5, demand=2.0, slow_rate=None,
                      period_us=PERIOD_US) == (100_000, 0.5)


def test_demand_is_a_running_average() -> None:
    assert learn_demand(None, 1.5) == 1.5
    assert learn_demand(1.0, 2.0) == pytest.approx(1.3)
