"""The hold law (rule action "hold") on a simulated first-order thermal plant, with no
clock: dT/dt = heat * speed - cool * (T - ambient), stepped explicitly. The law is given
no gains: the same defaults must hold every plant."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field

import pytest

from governor.control.laws import (
    HOLD_MAX_RATE,
    HOLD_RESPONSE,
    HoldState,
    HoldTuning,
    hold_step,
    start_hold,
)

TARGET = 80.0
AMBIENT = 30.0


@dataclass
class Run:
    temps: list[float] = field(default_factory=list)
    speeds: list[float] = field(default_factory=list)
    dt: float = 1.0
    state: HoldState = field(default_factory=start_hold)

    def settled_at(self, band: float) -> float | None:
        """The time from which the temperature stays within `band` of the target."""
        for i in range(len(self.temps)):
            if all(abs(t - TARGET) <= band for t in self.temps[i:]):
                return i * self.dt
        return None


def simulate(heat: float, cool: float, *, start: float, seconds: float, dt: float = 1.0,
             target: float = TARGET, min_speed: float = 0.1, lag: float = 0.0,
             noise: float = 0.0, ambient: float = AMBIENT,
             ambient_step: tuple[float, float] | None = None, speed: float = 1.0,
             seed: int = 7, tuning: HoldTuning | None = None) -> Run:
    """Close the loop for `seconds`; the sensor reads the plant `lag` seconds late, plus
    Gaussian noise; `ambient_step` = (at, by) raises the ambient midway."""
    rng = random.Random(seed)
    state = start_hold(speed)
    temp, run = start, Run(dt=dt)
    late = round(lag / dt)
    for k in range(round(seconds / dt)):
        now = k * dt
        amb = ambient + (ambient_step[1] if ambient_step and now >= ambient_step[0] else 0.0)
        run.temps.append(temp)
        reading = run.temps[max(0, len(run.temps) - 1 - late)] + rng.gauss(0.0, noise)
        state, speed = hold_step(state, reading, now, target=target, min_speed=min_speed,
                                 tuning=tuning or HoldTuning())
        run.speeds.append(speed)
        for _ in range(10):  # the plant, in finer steps than the law
            temp += dt / 10 * (heat * speed - cool * (temp - amb))
    run.state = state
    return run


def overshoot(run: Run) -> float:
    return max(run.temps) - TARGET


# the plant: unthrottled it heads for 90; holding 80 takes s* = 5/6
HEAT, COOL = 3.0, 0.05
S_STAR = COOL * (TARGET - AMBIENT) / HEAT


def _settle_limit(cool: float) -> float:
    """Three of the plant's time constants, plus four of the law's own response (the runs
    start 40 degrees off); a plant faster than the law (a 5 s one) settles at the law's
    pace, within some six of its responses."""
    return max(3.0 / cool + 4 * HOLD_RESPONSE, 6 * HOLD_RESPONSE + 15.0)


@pytest.mark.parametrize("dt", [1.0, 0.25])
@pytest.mark.parametrize("start", [40.0, 90.0], ids=["from-below", "from-above"])
def test_converges_to_the_target_at_the_best_steady_speed(start: float, dt: float) -> None:
    run = simulate(HEAT, COOL, start=start, seconds=300, dt=dt)
    settled = run.settled_at(0.5)
    assert settled is not None and settled <= _settle_limit(COOL)
    assert run.speeds[-1] == pytest.approx(S_STAR, abs=0.01)


def test_first_crossing_from_below_overshoots_at_most_one_degree() -> None:
    assert overshoot(simulate(HEAT, COOL, start=40.0, seconds=300)) <= 1.0
    hard = simulate(HEAT, COOL, start=40.0, seconds=300, lag=2.0, noise=0.3)
    assert overshoot(hard) <= 1.0


@pytest.mark.parametrize("cool", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("above", [10.0, 20.0, 30.0])
def test_holds_plants_it_was_not_tuned_for(cool: float, above: float) -> None:
    """Unthrottled steady states 10-30 degrees above the target, time constants 5-100 s,
    gains 60-80 degrees per unit speed: the same law, no per-plant gains."""
    heat = cool * (TARGET + above - AMBIENT)
    run = simulate(heat, cool, start=40.0, seconds=max(8.0 / cool, 200.0))
    # it learnt the plant's scale (within a factor of 2 is all the gains need)
    assert heat / 2 <= run.state.heat <= heat * 2
    settled = run.settled_at(0.5)
    assert settled is not None and settled <= _settle_limit(cool)
    assert run.speeds[-1] == pytest.approx(cool * (TARGET - AMBIENT) / heat, abs=0.01)
    # the learnt steady speed takes over from full speed just before the crossing
    assert overshoot(run) <= 0.5
    above_run = simulate(heat, cool, start=TARGET + above - 1, seconds=max(8.0 / cool, 200.0))
    settled = above_run.settled_at(0.5)
    assert settled is not None and settled <= _settle_limit(cool)


def test_follows_an_ambient_step() -> None:
    """+5 degrees halfway: back within the band, at the new best speed."""
    run = simulate(HEAT, COOL, start=40.0, seconds=600, ambient_step=(300.0, 5.0))
    after = Run(run.temps[300:], run.speeds[300:])
    settled = after.settled_at(0.5)
    assert settled is not None and settled <= 3.0 / COOL
    assert run.speeds[-1] == pytest.approx(COOL * (TARGET - AMBIENT - 5) / HEAT, abs=0.01)


def test_the_hard_scenario_lag_noise_and_an_ambient_step() -> None:
    """2 s of sensor lag, 0.3 degrees of noise, ambient +5 halfway: settles, stays within
    1 degree, and the speed does not swing."""
    run = simulate(HEAT, COOL, start=40.0, seconds=600, lag=2.0, noise=0.3,
                   ambient_step=(300.0, 5.0))
    for lo, hi in ((100, 300), (400, 600)):
        assert all(abs(t - TARGET) <= 1.0 for t in run.temps[lo:hi])
        speeds = run.speeds[lo:hi]
        # it jitters with the noise, by a few hundredths, never bang-bang
        assert statistics.pstdev(speeds) < 0.03
        assert max(speeds) - min(speeds) < 0.2


@pytest.mark.parametrize("dt", [1.0, 0.25])
def test_speed_stays_within_its_bounds_and_its_step_limit(dt: float) -> None:
    for start in (40.0, 90.0):
        run = simulate(HEAT, COOL, start=start, seconds=300, dt=dt, lag=2.0, noise=0.3,
                       min_speed=0.7, ambient_step=(150.0, 5.0))
        assert all(0.7 <= s <= 1.0 for s in run.speeds)
        steps = [abs(b - a) for a, b in zip([1.0, *run.speeds], run.speeds, strict=False)]
        assert max(steps) <= HOLD_MAX_RATE * dt + 1e-9


def test_pinned_at_full_speed_does_not_wind_up() -> None:
    """A target the plant never reaches keeps the speed at 1; when the plant heats more,
    the speed leaves 1 as the reading crosses, not after unwinding an integral."""
    state, temp, crossed = start_hold(), 60.0, None
    for k in range(1200):
        ambient = AMBIENT if k < 600 else AMBIENT + 15  # heads for 90, then 105
        state, speed = hold_step(state, temp, float(k), target=95.0, min_speed=0.1)
        if k < 600:
            assert speed == 1.0
        if crossed is None and temp > 95.0:
            crossed = k
        if crossed is not None and k >= crossed + 3:
            assert speed < 1.0
        temp += HEAT * speed - COOL * (temp - ambient)
    assert crossed is not None and abs(temp - 95.0) < 0.5


def test_pinned_at_min_speed_does_not_wind_up() -> None:
    """At min_speed the plant still sits above the target: the speed stays there, and
    leaves it as soon as the plant cools below the target."""
    state, temp, crossed = start_hold(), 70.0, None
    for k in range(1200):
        ambient = AMBIENT if k < 600 else AMBIENT - 20  # at 0.5: 60, then 40
        state, speed = hold_step(state, temp, float(k), target=50.0, min_speed=0.5)
        if 100 <= k < 600:
            assert speed == 0.5
        if k >= 600 and crossed is None and temp < 50.0:
            crossed = k
        if crossed is not None and k >= crossed + 3:
            assert speed > 0.5
        temp += HEAT * speed - COOL * (temp - ambient)
    assert crossed is not None and abs(temp - 50.0) < 0.5


@pytest.mark.parametrize("taken_over", [1.0, 0.6])
def test_bumpless_start(taken_over: float) -> None:
    """Taking over from the speed the jobs had: the first round keeps it, the next ones
    move by no more than the step limit, whatever the reading."""
    state = start_hold(taken_over)
    state, speed = hold_step(state, 95.0, 0.0, target=TARGET, min_speed=0.1)
    assert speed == taken_over
    state, speed = hold_step(state, 95.0, 1.0, target=TARGET, min_speed=0.1)
    assert taken_over - HOLD_MAX_RATE - 1e-9 <= speed < taken_over


def test_a_missing_reading_holds_the_speed_and_learns_nothing() -> None:
    state = start_hold()
    for k in range(30):
        state, _ = hold_step(state, 85.0 + k * 0.1, float(k), target=TARGET, min_speed=0.1)
    before = state
    state, speed = hold_step(state, None, 30.0, target=TARGET, min_speed=0.1)
    assert speed == before.speed and state == before
    # the next reading measures its step from the last one taken
    _, after = hold_step(state, 88.0, 31.0, target=TARGET, min_speed=0.1)
    assert abs(after - speed) <= HOLD_MAX_RATE * 1.0 + 1e-9


def test_tuning_is_optional_and_slower_tuning_is_gentler() -> None:
    """A slower response brakes less hard on a plant above its target."""
    brisk = simulate(HEAT, COOL, start=90.0, seconds=30)
    gentle = simulate(HEAT, COOL, start=90.0, seconds=30,
                      tuning=HoldTuning(response=2 * HOLD_RESPONSE))
    assert min(gentle.speeds) > min(brisk.speeds)


def test_a_stricter_hold_overriding_the_loop_neither_misleads_nor_winds_it_up() -> None:
    """Held at the target, then paused for 40 s by a stricter rule (the jobs run at 0
    whatever the loop asks): the law learns from the speed the jobs ran at, so the plant
    it knows stays true, and goes on from it when the pause ends, so the reading comes
    back to the target without overshooting it."""
    state, temp = start_hold(), 40.0
    temps: list[float] = []
    for k in range(400):
        paused = 200 <= k < 240
        state, speed = hold_step(state, temp, float(k), target=TARGET, min_speed=0.0,
                                 applied=0.0 if paused or k in (240,) else None)
        ran = 0.0 if paused else speed
        if paused:
            assert abs(state.speed - 0.0) <= HOLD_MAX_RATE + 1e-9, "it follows the pause"
        temps.append(temp)
        for _ in range(10):
            temp += 0.1 * (HEAT * ran - COOL * (temp - AMBIENT))
    assert min(temps[200:260]) < TARGET - 5, "the pause cooled it"
    assert max(temps[240:]) <= TARGET + 0.5
    assert all(abs(t - TARGET) <= 0.5 for t in temps[340:])
    assert HEAT / 2 <= state.heat <= HEAT * 2


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e308], ids=str)
def test_a_reading_or_target_that_is_not_a_number_never_makes_a_nan_speed(bad: float) -> None:
    """A sensor's NaN, an infinite reading, a NaN target, min_speed or applied speed (the
    config refuses these; the law must not rely on it): the speed stays a number within
    [min_speed, 1], the state stays finite, and the loop goes on when readings are good
    again. A non-finite reading or target holds the speed as a missing one does."""
    state = start_hold()
    for k in range(30):
        state, _ = hold_step(state, 70.0 + k * 0.1, float(k), target=TARGET, min_speed=0.1)
    before = state
    assert before.speed == 1.0
    state, speed = hold_step(state, bad, 30.0, target=TARGET, min_speed=0.1)
    assert math.isfinite(speed) and 0.1 <= speed <= 1.0
    if not math.isfinite(bad):
        assert speed == before.speed
        assert state == before, "a reading that is not a number is a missing one"
        state, speed = hold_step(state, 88.0, 31.0, target=bad, min_speed=0.1)
        assert speed == before.speed and state == before
    # (reading, target, min_speed, applied)
    steps = [(88.0, TARGET, bad, None), (88.0, TARGET, 0.1, bad), (bad, bad, bad, bad)]
    for k, (reading, target, min_speed, applied) in enumerate(steps, start=32):
        state, speed = hold_step(state, reading, float(k), target=target, min_speed=min_speed,
                                 applied=applied)
        assert math.isfinite(speed) and 0.0 <= speed <= 1.0, (k, speed)
    for k in range(35, 60):
        state, speed = hold_step(state, 90.0, float(k), target=TARGET, min_speed=0.1)
        assert math.isfinite(speed) and 0.1 <= speed <= 1.0
    assert all(math.isfinite(v) for v in (state.speed, state.integral, state.rise,
                                          *state.theta))
    if not math.isfinite(bad):  # a huge finite reading was taken, and is slowly forgotten
        assert speed < before.speed, "above the target, the loop slows the jobs"
    _, speed = hold_step(start_hold(bad), 85.0, 0.0, target=TARGET, min_speed=0.1)
    assert math.isfinite(speed)
