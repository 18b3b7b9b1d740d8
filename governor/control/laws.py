"""The control laws of the actuators, pure like the policy: state and a reading in, state
and an output out; no clock, no files, no processes.

The actuators measure (CPU seconds, cgroup usage) and act (signals, cpu.max); what they
do with a measurement is decided here, so it is tested without root or real jobs.

The hold law (`hold_step`, rule action "hold") keeps a series at a target by setting the
speed of the jobs it touches. It is not tuned per machine: a device's response to speed
spans some 200-fold (10-80 degrees per unit speed, time constants 5-120 s), so the law
learns the one number that scales a loop, the heating rate per unit speed, with the
cooling rate, from what it observes, and derives its gains from them by the SIMC rules
for a first-order plant, with one machine-independent knob, the closed loop's time
constant. Why each piece is as it is: the comment above `HoldTuning`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

# ---- the duty cycle (SignalActuator) ----

#: CPU seconds a window needs before it says anything; an idle job's window grows instead
MIN_WINDOW_CPU = 0.02
MAX_WINDOW = 5.0
#: share of the error corrected per window; below 1, so the run fraction never overshoots
GAIN = 0.5
MIN_FRACTION = 0.01
#: a job slowed that used more than this many times its free rate over a window was not
#: running free as it does now (it was starting up, or waiting): its rate while running is
#: used instead (the margin is for CPU time counted in clock ticks)
STALE_FREE_RATE = 1.25


class DutyWindow(NamedTuple):
    """What a slowed job did over one feedback window of its duty cycle."""

    #: seconds the window lasted, running and stopped phases together
    window: float
    #: seconds the job was let run, and the CPU seconds it used in them
    run_time: float
    run_cpu: float
    #: CPU seconds the job used over the whole window
    window_cpu: float
    #: the cores the job used running free before it was slowed, when measured
    free_rate: float | None = None


class DutyStep(NamedTuple):
    #: share of each period the job runs from now on
    fraction: float
    #: the window said enough (or lasted long enough): start a new one
    close_window: bool
    #: the share the job got over the window, when it could be judged
    achieved: float | None = None
    #: CPU cores the job uses while running, when it could be judged
    demand: float | None = None


def clamp_fraction(fraction: float) -> float:
    return min(1.0, max(MIN_FRACTION, fraction))


def job_demand(window: DutyWindow) -> float:
    """The cores the job would use running free: its rate while running, or, lower, the
    rate it used before it was slowed. A job that mostly waits (on a GPU, on I/O) makes up
    for a stop the moment it runs again, so while running it uses more than it would
    free, and a speed judged by that rate alone gives it more than it asked; a job that
    mostly computes runs at the same rate either way. A free rate the slowed job has
    outdone over the window is not used: it was measured while the job did less than it
    does now (STALE_FREE_RATE)."""
    running = window.run_cpu / window.run_time
    free = window.free_rate
    if free is None or window.window_cpu > STALE_FREE_RATE * free * window.window:
        return running
    return min(free, running)


def steer_duty(fraction: float, target: float, window: DutyWindow) -> DutyStep:
    """Steer the run fraction by the share the job got over the window: the CPU it used
    over what it would have used running free all along (`job_demand`)."""
    if window.run_cpu >= MIN_WINDOW_CPU and window.run_time > 0:
        demand = job_demand(window)
        achieved = window.window_cpu / (demand * window.window)
        return DutyStep(clamp_fraction(fraction + GAIN * (target - achieved)), True,
                        achieved, demand)
    return DutyStep(fraction, window.window >= MAX_WINDOW)


def retarget_duty(fraction: float, target: float, new_target: float) -> float:
    """A new target keeps the correction learnt for the old one."""
    return clamp_fraction(fraction + new_target - target)


# ---- the CPU quota (CgroupActuator) ----

#: the kernel's smallest CFS quota
MIN_QUOTA_US = 1000
#: a job measured idle before it is slowed still gets this many cores times its speed
MIN_DEMAND = 1.0
#: weight of the newest unthrottled measurement in the demand average
DEMAND_WEIGHT = 0.3
#: each feedback window the quota moves by (target / measured) ** FEEDBACK_GAIN, within
#: FEEDBACK_STEP
FEEDBACK_GAIN = 0.5
FEEDBACK_STEP = (0.5, 2.0)
#: the usage of a slowed job is judged over this many CFS periods. A job with more
#: threads than its quota's cores spends each period's quota in a burst at its start and
#: is throttled for the rest, so a window of one period (the round, at the default 0.1 s
#: and `slow_period`) holds one burst, two or part of one: from 0 to twice the quota
#: (measured, issue 15: 1.0 to 1.7 cores under a quota of 0.7). Corrected on such
#: readings, a 2-thread job's quota wandered from 0.4 to 1.6 cores and never settled.
FEEDBACK_PERIODS = 5


class QuotaState(NamedTuple):
    """The quota set last, and the speed it was set for; None while the job runs free."""

    quota_us: int | None = None
    speed: float | None = None


def learn_demand(demand: float | None, rate: float) -> float:
    """The running average of the cores a job uses unthrottled, with a new rate."""
    return rate if demand is None else demand + DEMAND_WEIGHT * (rate - demand)


def next_quota(state: QuotaState, speed: float, *, demand: float | None,
               slow_rate: float | None, period_us: int) -> QuotaState:
    """speed * demand * period, then corrected each round by how far the usage measured
    while slowed (`slow_rate`, in cores) is from that target; a new speed keeps the
    correction learnt so far. The quota stays within [MIN_QUOTA_US, demand * period]."""
    speed = min(max(speed, 0.0), 1.0)
    cores = max(demand or 0.0, MIN_DEMAND)
    if state.quota_us is None or not state.speed:
        quota: float = speed * cores * period_us
    elif state.speed != speed:
        quota = state.quota_us * speed / state.speed
    elif slow_rate is not None:
        step = (speed * cores / max(slow_rate, 1e-3)) ** FEEDBACK_GAIN
        quota = state.quota_us * min(max(step, FEEDBACK_STEP[0]), FEEDBACK_STEP[1])
    else:
        quota = state.quota_us
    return QuotaState(round(min(max(quota, MIN_QUOTA_US), cores * period_us)), speed)


# ---- holding a series at a target (rule action "hold") ----
#
# A model-based proportional-integral law with derivative on the reading, on a
# first-order plant
#     dT/dt = heat * speed - cool * (T - HOLD_PRIOR_AMBIENT) + offset
# that it fits online (offset: the ambient's distance from the prior, and whatever else
# heats the device). Its speed is the fitted plant's steady speed at the target, plus a
# small integral correction, minus a proportional term on the error and the rise. Why
# each piece:
#
# * Gains normalised by the plant, not tuned per machine: what sets the scale of the loop
#   is `heat`, degrees per second per unit of speed (the plant's gain over its time
#   constant: 10-80 degrees per unit speed over 5-120 s, a 200-fold range), so no fixed
#   gain suits every device. The law fits heat, cool and offset by a small Kalman filter
#   on the filtered slope, and sets its gains by the SIMC rules for a first-order plant:
#   Kp = 1 / (heat * response), Ti = min(1 / cool, 4 * response), with one
#   machine-independent knob, the closed loop's time constant `response` (8 s: a couple
#   of seconds of sensor lag and the filter's second fit in it).
# * The fitted plant's steady speed at the target (cool * (target - prior) - offset) /
#   heat is the law's feedforward, so the integral has almost nothing left to do: a plain
#   PI law has to integrate its way up to the steady speed while the reading climbs, and
#   that integral is what overshoots the target and then takes a time constant to unwind.
#   A change of ambient moves the fitted offset within seconds, and the steady speed with
#   it, faster than an integral would.
# * The integral only corrects what the fit gets wrong (a bias from lag or noise), and so
#   it integrates only near a steady state at the target (the proportional term asks for
#   less than HOLD_INTEGRATE_WITHIN of speed, and the reading moves less than that much
#   speed would move it): on the way there, the feedforward and the proportional term
#   steer, and nothing winds up that would overshoot.
# * Taking over at one steady speed tells heat from offset only through the ambient's
#   prior (30 degrees; a device cools towards its inlet air, 20-45 degrees, far more alike
#   across machines than heat is), so the fit is usable before the speed has moved; the
#   offset drifts fast in the fit and heat and cool slowly, so a change of ambient is
#   learnt as one rather than as a change of heat (which would change the gains). The fit
#   starts after HOLD_WARMUP filter time constants: until the filter has caught up with
#   the reading, its slope says nothing about the plant, and until then the feedforward is
#   the speed taken over.
# * Derivative on the reading, over a quarter of the response (HOLD_LEAD): a reading
#   climbing towards the target from below slows the jobs just before it crosses, so the
#   first crossing overshoots little; on the reading, not the error, so a new target does
#   not kick.
# * Anti-windup: while the speed is pinned at 1 or at min_speed, or held back by the step
#   limit, in the direction the error pushes, the integral does not move. Nor while a
#   stricter hold overrides the loop (`applied`): the law then learns from the speed the
#   jobs really ran at and goes on from it (bumpless transfer back), not from its own.
# * Bumpless start: the first reading only starts the filters, and the speed then moves
#   from the one taken over by at most the step limit.
# * A first-order low-pass on the reading (`filter_s`) for sensor noise; the same filter on
#   the speed (plus HOLD_DELAY, the actuator's lag), so the filtered pair still obeys the
#   plant's equation and the fit is not biased by the filter's lag.
# * A bounded step (`max_rate`, speed per second) so one bad reading cannot slam the jobs.
# * A missing reading (None) holds the speed and neither integrates nor learns; so does a
#   reading, a target or a time that is not a finite number (a sensor's NaN, an overflow):
#   one NaN let in would make every speed after it NaN. The config refuses a non-finite
#   target; the law does not rely on it.

#: the closed loop's time constant asked of the law (SIMC's tau_c + delay), seconds:
#: long enough for a couple of seconds of sensor lag and a filtered reading
HOLD_RESPONSE = 8.0
#: the reading's low-pass time constant, seconds
HOLD_FILTER = 1.0
#: most the speed moves per second
HOLD_MAX_RATE = 0.25
#: the lag the fit assumes between a speed and the device's response to it, seconds: an
#: actuator takes a period or two of its duty cycle to reach a new speed, and a sensor
#: reads late; assumed too long, it only makes the fitted heat larger and the loop gentler
HOLD_DELAY = 0.5
#: how far ahead the derivative term looks, as a share of the response: a longer look
#: brakes earlier on the way up but lets sensor noise move the speed more, which in the
#: simulated sweep overshot more, not less
HOLD_LEAD = 0.25
#: the plant's prior: heat (degrees per second per unit speed, loose: the first rounds'
#: rise replace it) and cool (1/s, a 20 s plant, mid-range); the bounds keep a noisy fit
#: sane, and with it the gains
HOLD_PRIOR_HEAT = 4.0
HOLD_PRIOR_COOL = 0.05
#: what the plant cools towards, degrees: the prior that lets a rise at one steady speed
#: tell heat from cooling before the speed has moved (the fit keeps a small correction)
HOLD_PRIOR_AMBIENT = 30.0
HOLD_HEAT_RANGE = (0.05, 50.0)
HOLD_COOL_RANGE = (1.0 / 600.0, 1.0)
#: how fast the fit lets its parameters drift (variance gained per second): heat and
#: cooling by some 0.3 % of themselves (they change with the job, slowly), the offset
#: (the ambient, other heat) by some 0.03 degrees per second, so that a change of ambient
#: is learnt as one, not as a change of heat
HOLD_DRIFT = (1e-5, 1e-5, 1e-3)
#: the variance of a measured slope, (degrees per second) squared
HOLD_SLOPE_NOISE = 0.05
#: the fit's largest covariance trace, a guard against a long stretch that tells nothing
HOLD_MAX_TRACE = 1e3
#: the fit starts this many filter time constants after the first reading
HOLD_WARMUP = 3.0
#: the integral corrects only near a steady state: while the proportional term asks for
#: less speed than this, and the reading moves less than this much speed would move it
HOLD_INTEGRATE_WITHIN = 0.1
#: the most the integral corrects the fitted steady speed by
HOLD_MAX_CORRECTION = 0.5
#: jobs that ran this much slower than the loop asked were held by something stricter
#: (the margin covers the steps the speed is given in)
HOLD_OVERRIDDEN = 0.02

_Vec3 = tuple[float, float, float]
_Mat3 = tuple[_Vec3, _Vec3, _Vec3]


class HoldTuning(NamedTuple):
    """The few knobs; their defaults need no knowledge of the machine."""

    response: float = HOLD_RESPONSE
    filter_s: float = HOLD_FILTER
    max_rate: float = HOLD_MAX_RATE
    delay: float = HOLD_DELAY


#: the defaults, shared
HOLD_TUNING = HoldTuning()


class HoldState(NamedTuple):
    """Everything the law remembers between rounds. `start_hold` makes the first one."""

    #: the speed given last
    speed: float
    #: the integral correction to the fitted plant's steady speed at the target
    integral: float = 0.0
    #: the low-passed rise of the reading, degrees per second: the law brakes ahead of
    #: a crossing
    rise: float = 0.0
    #: the time of the last reading taken, None before the first
    time: float | None = None
    #: the time of the first reading: the fit starts HOLD_WARMUP filter constants later
    started: float | None = None
    #: the speed taken over: the feedforward until the fit has started
    taken_over: float = 1.0
    #: the low-passed reading and speed, None before the first reading
    reading: float | None = None
    filtered_speed: float | None = None
    #: the fit of (heat, -cool, offset) and its covariance
    theta: _Vec3 = (HOLD_PRIOR_HEAT, -HOLD_PRIOR_COOL, 0.0)
    covariance: _Mat3 = ((100.0, 0.0, 0.0), (0.0, 1e-2, 0.0), (0.0, 0.0, 1e-2))

    @property
    def heat(self) -> float:
        """Degrees per second one unit of speed adds, as learnt (within its bounds)."""
        return min(max(self.theta[0], HOLD_HEAT_RANGE[0]), HOLD_HEAT_RANGE[1])

    @property
    def cool(self) -> float:
        """The plant's inverse time constant, as learnt (within its bounds)."""
        return min(max(-self.theta[1], HOLD_COOL_RANGE[0]), HOLD_COOL_RANGE[1])

    def steady_speed(self, target: float) -> float:
        """The speed at which the fitted plant would stay at `target` (unbounded)."""
        return (self.cool * (target - HOLD_PRIOR_AMBIENT) - self.theta[2]) / self.heat


def _unit(value: float, default: float) -> float:
    """`value` within [0, 1]; `default` when it is not a number (NaN passes through
    min and max unchanged, so it must be caught before them)."""
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else default


def start_hold(speed: float = 1.0) -> HoldState:
    """The state taking over from jobs running at `speed` (1: free), so the first round
    starts from there rather than jumping."""
    speed = _unit(speed, 1.0)
    return HoldState(speed=speed, taken_over=speed)


def _vec(v: list[float]) -> _Vec3:
    return (v[0], v[1], v[2])


def _fit(theta: _Vec3, p: _Mat3, x: _Vec3, y: float, drift: _Vec3) -> tuple[_Vec3, _Mat3]:
    """One Kalman step of the fit of y = theta . x, the parameters random walks (`drift`:
    the variance each gains over the step) and y measured with variance HOLD_SLOPE_NOISE.
    Unlike a forgetting factor, the drift is per parameter: what the fit cannot explain
    goes to the offset, which drifts fast, not to heat or cooling, which barely do."""
    prior = [[p[i][j] + (drift[i] if i == j else 0.0) for j in range(3)] for i in range(3)]
    px = [sum(prior[i][j] * x[j] for j in range(3)) for i in range(3)]
    gain = [v / (HOLD_SLOPE_NOISE + sum(x[i] * px[i] for i in range(3))) for v in px]
    err = y - sum(theta[i] * x[i] for i in range(3))
    new_theta = _vec([theta[i] + gain[i] * err for i in range(3)])
    rows = [_vec([prior[i][j] - gain[i] * px[j] for j in range(3)]) for i in range(3)]
    trace = rows[0][0] + rows[1][1] + rows[2][2]
    scale = min(1.0, HOLD_MAX_TRACE / trace) if trace > 0 else 1.0
    new_p = (_vec([v * scale for v in rows[0]]), _vec([v * scale for v in rows[1]]),
             _vec([v * scale for v in rows[2]]))
    return new_theta, new_p


def hold_step(state: HoldState, reading: float | None, now: float, *, target: float,
              min_speed: float, tuning: HoldTuning = HOLD_TUNING,
              applied: float | None = None) -> tuple[HoldState, float]:
    """One round of the hold law: the new state and the speed to give the jobs, within
    [min_speed, 1] and at most `tuning.max_rate` per second from the last one.

    `applied`: the speed the jobs really ran at since the last round, when a stricter
    hold (a pause rule, an operator) overrode the loop's; the law learns from it and goes
    on from it, as from a bound, instead of from a speed nobody ran at."""
    low = _unit(min_speed, 0.0)
    speed = max(_unit(state.speed, 1.0), low)
    if applied is not None and not math.isfinite(applied):
        applied = None
    overridden = applied is not None and applied < speed - HOLD_OVERRIDDEN
    if overridden and applied is not None:
        speed = _unit(applied, speed)
    if (reading is None or not math.isfinite(reading) or not math.isfinite(target)
            or not math.isfinite(now) or (state.time is not None and now <= state.time)):
        # nothing new, or nothing to go by: hold the speed, integrate and learn nothing
        return state._replace(speed=speed), speed
    if state.time is None or state.reading is None or state.filtered_speed is None:
        # the first reading: the filters start from it, nothing moves yet
        return state._replace(speed=speed, time=now, reading=reading, started=now,
                              filtered_speed=speed), speed
    dt = now - state.time
    alpha = dt / (tuning.filter_s + dt)
    filtered = state.reading + alpha * (reading - state.reading)
    filtered_speed = state.filtered_speed + dt / (tuning.filter_s + tuning.delay + dt) * (
        speed - state.filtered_speed)
    slope = (filtered - state.reading) / dt

    # learn the plant, once the filter has caught up: the filtered reading's slope
    # against the filtered speed and reading (the step's midpoints) and 1, the reading
    # measured from the ambient's prior
    learnt = state
    started = state.started if state.started is not None else state.time
    fitted = now - started >= HOLD_WARMUP * tuning.filter_s
    if fitted:
        drift = (HOLD_DRIFT[0] * state.heat ** 2 * dt, HOLD_DRIFT[1] * state.cool ** 2 * dt,
                 HOLD_DRIFT[2] * dt)
        theta, cov = _fit(state.theta, state.covariance,
                          ((state.filtered_speed + filtered_speed) / 2,
                           (state.reading + filtered) / 2 - HOLD_PRIOR_AMBIENT, 1.0), slope,
                          drift)
        learnt = state._replace(theta=theta, covariance=cov)

    rise = state.rise + dt / (tuning.response + dt) * (slope - state.rise)
    kp = 1.0 / (learnt.heat * tuning.response)
    ti = min(1.0 / learnt.cool, 4.0 * tuning.response)
    error = filtered - target
    integral = state.integral
    if (not overridden and kp * abs(error) <= HOLD_INTEGRATE_WITHIN
            and abs(rise) <= HOLD_INTEGRATE_WITHIN * learnt.heat):
        integral = min(max(integral - kp / ti * error * dt, -HOLD_MAX_CORRECTION),
                       HOLD_MAX_CORRECTION)
    # until the fit has started, the prior's steady speed says nothing of this device
    feedforward = min(max(learnt.steady_speed(target) if fitted else state.taken_over, low),
                      1.0)
    wanted = feedforward + integral - kp * (error + HOLD_LEAD * tuning.response * rise)
    bound = tuning.max_rate * dt
    new_speed = min(max(wanted, speed - bound, low), speed + bound, 1.0)
    if (wanted > new_speed and error < 0) or (wanted < new_speed and error > 0):
        # pinned at a bound or held back by the step limit: integrating would wind up
        integral = state.integral
    if not all(math.isfinite(v) for v in (new_speed, integral, rise, filtered,
                                          filtered_speed, *learnt.theta)):
        # finite inputs far out of range (1e308 degrees) overflowed: hold, as for a
        # reading that is not a number
        return state._replace(speed=speed), speed
    return learnt._replace(speed=new_speed, integral=integral, rise=rise, time=now,
                           reading=filtered, filtered_speed=filtered_speed), new_speed
