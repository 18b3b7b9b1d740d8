"""The control laws of the actuators, pure like the policy: state and a reading in, state
and an output out; no clock, no files, no processes.

The actuators measure (CPU seconds, cgroup usage) and act (signals, cpu.max); what they
do with a measurement is decided here, so it is tested without root or real jobs.
"""

from __future__ import annotations

from typing import NamedTuple

# ---- the duty cycle (SignalActuator) ----

#: CPU seconds a window needs before it says anything; an idle job's window grows instead
MIN_WINDOW_CPU = 0.02
MAX_WINDOW = 5.0
#: share of the error corrected per window; below 1, so the run fraction never overshoots
GAIN = 0.5
MIN_FRACTION = 0.01


class DutyWindow(NamedTuple):
    """What a slowed job did over one feedback window of its duty cycle."""

    #: seconds the window lasted, running and stopped phases together
    window: float
    #: seconds the job was let run, and the CPU seconds it used in them
    run_time: float
    run_cpu: float
    #: CPU seconds the job used over the whole window
    window_cpu: float


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


def steer_duty(fraction: float, target: float, window: DutyWindow) -> DutyStep:
    """Steer the run fraction by the share the job got over the window: the CPU it used
    over what it would have used running free all along (its rate while running)."""
    if window.run_cpu >= MIN_WINDOW_CPU and window.run_time > 0:
        demand = window.run_cpu / window.run_time
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
#: each round the quota moves by (target / measured) ** FEEDBACK_GAIN, within FEEDBACK_STEP
FEEDBACK_GAIN = 0.5
FEEDBACK_STEP = (0.5, 2.0)


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
