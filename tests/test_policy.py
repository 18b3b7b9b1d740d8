"""The policy as a pure function: feed snapshots, read rule states and directives.

No processes, files, clocks or sleeps: time is the number each snapshot carries.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest

from governor.config import RuleConfig, parse_config
from governor.control.holds import HoldLoops, carry_holds, outputs, step_holds
from governor.control.laws import start_hold
from governor.jobs.model import RUN, Action, Job, Mode
from governor.policy.directives import decide, rule_states_view
from governor.policy.rules import Phase, RuleStates, carry_over, evaluate_rules
from governor.snapshot import Snapshot, reading


def rule(**fields: Any) -> RuleConfig:
    base = {"name": "hot", "metric": "gpu_temperature_celsius", "above": 85.0,
            "clear_below": 80.0, "action": "pause"}
    base.update(fields)
    return parse_config({"rules": [base]}).rules[0]


def gpu_temps(now: float, **temps: float) -> Snapshot:
    readings = tuple(reading("gpu_temperature_celsius", t, gpu=g.removeprefix("gpu"))
                     for g, t in temps.items())
    return Snapshot(int(now * 10), now, now, readings, (), MappingProxyType({}))


def job(job_id: str, *devices: str, priority: int = 0, operator: bool = False) -> Job:
    return Job(id=job_id, name=job_id, mode=Mode.COOPERATIVE, pid=None, pid_started_at=None,
               cgroup=None, devices=devices, priority=priority, registered_at=0.0,
               held_by_operator=operator)


class Run:
    """Feeds a sequence of snapshots through the rules, as the daemon's rounds do."""

    def __init__(self, *rules: RuleConfig):
        self.rules = list(rules)
        self.states: RuleStates = {}
        self.transitions: list[Any] = []

    def feed(self, snapshot: Snapshot) -> Phase:
        self.states, moved = evaluate_rules(self.rules, self.states, snapshot, snapshot.monotonic)
        self.transitions += moved
        return self.phase()

    def phase(self, gpu: str = "0", name: str = "hot") -> Phase:
        state = self.states.get(name, {}).get((("gpu", gpu),))
        return state.phase if state else Phase.OK


def test_for_zero_trips_at_the_first_reading_over_the_line() -> None:
    run = Run(rule(**{"for": 0}))
    assert run.feed(gpu_temps(0, gpu0=85.0)) is Phase.OK  # at the line is not above it
    assert run.feed(gpu_temps(1, gpu0=85.1)) is Phase.TRIPPED


def test_pending_then_tripped_after_for() -> None:
    run = Run(rule(**{"for": 5}))
    assert run.feed(gpu_temps(0, gpu0=90)) is Phase.PENDING
    assert run.feed(gpu_temps(4.9, gpu0=90)) is Phase.PENDING
    assert run.feed(gpu_temps(5.0, gpu0=90)) is Phase.TRIPPED


def test_one_reading_under_the_line_resets_the_trip_timer() -> None:
    run = Run(rule(**{"for": 5}))
    run.feed(gpu_temps(0, gpu0=90))
    assert run.feed(gpu_temps(3, gpu0=84)) is Phase.OK
    assert run.feed(gpu_temps(4, gpu0=90)) is Phase.PENDING
    assert run.feed(gpu_temps(8.9, gpu0=90)) is Phase.PENDING
    assert run.feed(gpu_temps(9, gpu0=90)) is Phase.TRIPPED


def test_clears_only_below_clear_below_held_for_clear_for() -> None:
    run = Run(rule(**{"for": 0, "clear_for": 30}))
    run.feed(gpu_temps(0, gpu0=90))
    assert run.feed(gpu_temps(1, gpu0=82)) is Phase.TRIPPED  # inside the band
    assert run.feed(gpu_temps(2, gpu0=79)) is Phase.CLEARING
    assert run.feed(gpu_temps(31.9, gpu0=79)) is Phase.CLEARING
    assert run.feed(gpu_temps(32, gpu0=79)) is Phase.OK


def test_one_reading_above_the_clear_line_resets_the_clear_timer() -> None:
    run = Run(rule(**{"for": 0, "clear_for": 10}))
    run.feed(gpu_temps(0, gpu0=90))
    run.feed(gpu_temps(1, gpu0=79))
    assert run.feed(gpu_temps(5, gpu0=80.5)) is Phase.TRIPPED
    assert run.feed(gpu_temps(6, gpu0=79)) is Phase.CLEARING
    assert run.feed(gpu_temps(15.9, gpu0=79)) is Phase.CLEARING
    assert run.feed(gpu_temps(16, gpu0=79)) is Phase.OK


def test_oscillating_inside_the_band_does_not_flap() -> None:
    """A reading that swings around the trip line, inside the hysteresis band: one trip,
    no clear, however long it goes on."""
    run = Run(rule(**{"for": 0, "clear_for": 5}))
    for t in range(200):
        run.feed(gpu_temps(t * 0.5, gpu0=84.0 if t % 2 else 86.0))
    assert run.phase() is Phase.TRIPPED
    assert [(t.before, t.after) for t in run.transitions] == [(Phase.OK, Phase.TRIPPED)]


def test_below_rules_and_their_hysteresis() -> None:
    r = parse_config({"rules": [{"name": "hot", "metric": "gpu_temperature_celsius",
                                 "below": 10, "clear_above": 15}]}).rules[0]
    run = Run(r)
    assert run.feed(gpu_temps(0, gpu0=9)) is Phase.TRIPPED
    assert run.feed(gpu_temps(1, gpu0=12)) is Phase.TRIPPED
    assert run.feed(gpu_temps(2, gpu0=16)) is Phase.OK


def test_without_clear_below_it_clears_below_the_trip_line() -> None:
    run = Run(rule(clear_below=None, **{"for": 0}))
    run.feed(gpu_temps(0, gpu0=90))
    assert run.feed(gpu_temps(1, gpu0=85)) is Phase.TRIPPED
    assert run.feed(gpu_temps(2, gpu0=84.9)) is Phase.OK


def test_each_series_has_its_own_state() -> None:
    run = Run(rule(**{"for": 0}))
    run.feed(gpu_temps(0, gpu0=70, gpu1=90))
    assert (run.phase("0"), run.phase("1")) == (Phase.OK, Phase.TRIPPED)


def test_match_selects_series() -> None:
    run = Run(rule(match={"gpu": "1"}, **{"for": 0}))
    run.feed(gpu_temps(0, gpu0=99, gpu1=70))
    assert run.states["hot"] == {(("gpu", "1"),): run.states["hot"][(("gpu", "1"),)]}


@pytest.mark.parametrize(("on_missing", "phase"), [("hold", Phase.TRIPPED), ("clear", Phase.OK)])
def test_a_tripped_series_that_stops_reporting(on_missing: str, phase: Phase) -> None:
    run = Run(rule(on_missing=on_missing, **{"for": 0}))
    run.feed(gpu_temps(0, gpu0=90))
    assert run.feed(gpu_temps(1)) is phase


def test_on_missing_trip() -> None:
    run = Run(rule(on_missing="trip", **{"for": 5}))
    run.feed(gpu_temps(0, gpu0=70))
    assert run.feed(gpu_temps(1)) is Phase.TRIPPED
    state = run.states["hot"][(("gpu", "0"),)]
    assert state.missing and state.value is None
    # back and cool: it clears as usual
    assert run.feed(gpu_temps(2, gpu0=70)) is Phase.OK


def test_on_missing_hold_keeps_pending_and_forgets_ok() -> None:
    run = Run(rule(**{"for": 5}))
    run.feed(gpu_temps(0, gpu0=90, gpu1=70))
    run.feed(gpu_temps(1))
    assert run.phase("0") is Phase.PENDING
    assert (("gpu", "1"),) not in run.states["hot"]


def test_a_host_rule_touches_every_job_and_a_device_rule_only_its_devices() -> None:
    host = parse_config({"rules": [{"name": "mem", "metric": "memory_used_ratio", "above": 0.9,
                                    "action": "slow", "speed": 0.5}]}).rules[0]
    gpu = rule(**{"for": 0})
    jobs = [job("a", "gpu0"), job("b", "gpu1"), job("c")]
    snap = Snapshot(1, 0, 0, (reading("memory_used_ratio", 0.95),
                              reading("gpu_temperature_celsius", 90, gpu="1")), (),
                    MappingProxyType({}))
    states, _ = evaluate_rules([host, gpu], {}, snap, 0)
    directives, caps = decide([host, gpu], states, jobs)
    assert directives["a"].action is Action.SLOW and directives["a"].speed == 0.5
    assert directives["b"].action is Action.PAUSE
    assert directives["c"].action is Action.SLOW
    assert set(directives["b"].rules) == {"mem", "hot"}
    assert caps == {}


def test_most_restrictive_wins() -> None:
    slow_a = rule(name="slow-a", action="slow", speed=0.7, **{"for": 0})
    slow_b = rule(name="slow-b", action="slow", speed=0.4, **{"for": 0})
    run = Run(slow_a, slow_b)
    run.feed(gpu_temps(0, gpu0=90))
    directives, _ = decide(run.rules, run.states, [job("a", "gpu0")])
    assert (directives["a"].action, directives["a"].speed) == (Action.SLOW, 0.4)
    assert len(directives["a"].reasons) == 2
    run.rules.append(rule(name="stop", **{"for": 0}))
    run.feed(gpu_temps(1, gpu0=90))
    directives, _ = decide(run.rules, run.states, [job("a", "gpu0")])
    assert (directives["a"].action, directives["a"].speed) == (Action.PAUSE, 0.0)


def test_max_priority_spares_important_jobs() -> None:
    run = Run(rule(max_priority=10, **{"for": 0}))
    run.feed(gpu_temps(0, gpu0=90))
    directives, _ = decide(run.rules, run.states, [job("low", "gpu0", priority=10),
                                                   job("high", "gpu0", priority=11)])
    assert directives["low"].action is Action.PAUSE
    assert directives["high"] == RUN


def test_operator_pause_holds_whatever_the_rules_say() -> None:
    directives, _ = decide([], {}, [job("a", operator=True), job("b")])
    assert directives["a"].action is Action.PAUSE and directives["a"].rules == ("operator",)
    assert directives["b"] == RUN


def test_nvml_bound_jobs_count_as_bound() -> None:
    run = Run(rule(**{"for": 0}))
    run.feed(gpu_temps(0, gpu1=90))
    auto = job("auto")
    auto.auto_devices = frozenset({"gpu1"})
    explicit = job("explicit", "gpu0")
    explicit.auto_devices = frozenset({"gpu1"})  # registration wins over NVML
    directives, _ = decide(run.rules, run.states, [auto, explicit])
    assert directives["auto"].action is Action.PAUSE
    assert directives["explicit"] == RUN


def test_power_cap_needs_a_bound_job_and_takes_the_lowest_cap() -> None:
    cap_a = rule(name="cap-a", action="power_cap", power_cap_watts=300, **{"for": 0})
    cap_b = rule(name="cap-b", action="power_cap", power_cap_watts=250, **{"for": 0})
    run = Run(cap_a, cap_b)
    run.feed(gpu_temps(0, gpu0=90, gpu1=90))
    directives, caps = decide(run.rules, run.states, [job("a", "gpu0")])
    assert directives["a"] == RUN, "a power cap does not hold the job itself"
    assert set(caps) == {"gpu0"}, "no job on gpu1: no cap there"
    assert caps["gpu0"].watts == 250 and caps["gpu0"].gpu == "0"
    assert caps["gpu0"].rules == ("cap-a", "cap-b")
    assert decide(run.rules, run.states, [])[1] == {}, "the job set emptied: caps lifted"


def test_reasons_name_the_rule_series_and_value() -> None:
    run = Run(rule(**{"for": 0}))
    run.feed(gpu_temps(0, gpu0=88))
    directives, _ = decide(run.rules, run.states, [job("a", "gpu0")])
    assert directives["a"].reasons == ('hot: gpu_temperature_celsius{gpu="0"} = 88 (above 85)',)


def test_inside_the_hysteresis_band_the_reason_says_what_tripped_and_what_releases() -> None:
    """Between the lines a reading is neither above the trip line nor past the clear one:
    the reason must not call 81.2 -> 82.5 -> 83.0 "above 85"."""
    run = Run(rule(clear_for="2s", **{"for": 0}))

    def why(now: float, temp: float) -> str:
        run.feed(gpu_temps(now, gpu0=temp))
        directives, _ = decide(run.rules, run.states, [job("a", "gpu0")])
        (text,) = directives["a"].reasons
        return text

    series = 'hot: gpu_temperature_celsius{gpu="0"}'
    assert why(0, 86.2) == f"{series} = 86.2 (above 85)"
    assert why(1, 88) == f"{series} = 88 (above 85)"
    inside = f"{series} tripped above 85 at 86.2; held until below 80 for 2s; now 82.5"
    assert why(2, 82.5) == inside
    clearing = why(3, 79.5)
    assert run.phase() is Phase.CLEARING
    assert clearing == f"{series} tripped above 85 at 86.2; held until below 80 for 2s; now 79.5"
    assert why(4, 81) == f"{series} tripped above 85 at 86.2; held until below 80 for 2s; now 81", (
        "back inside the band: tripped again, by the same first reading")


def test_the_band_reason_of_a_below_rule_and_of_one_with_no_clear_for() -> None:
    run = Run(rule(name="cold", metric="gpu_temperature_celsius", below=10.0, clear_above=15.0,
                   above=None, clear_below=None, **{"for": 0}))
    run.feed(gpu_temps(0, gpu0=8))
    run.feed(gpu_temps(1, gpu0=12.5))
    directives, _ = decide(run.rules, run.states, [job("a", "gpu0")])
    assert directives["a"].reasons == (
        'cold: gpu_temperature_celsius{gpu="0"} tripped below 10 at 8; held until above 15; '
        "now 12.5",)


def test_the_band_reason_of_a_series_that_tripped_by_going_missing() -> None:
    run = Run(rule(on_missing="trip", **{"for": 0}))
    run.feed(gpu_temps(0, gpu0=70))
    run.feed(gpu_temps(1))
    run.feed(gpu_temps(2, gpu0=82))
    directives, _ = decide(run.rules, run.states, [job("a", "gpu0")])
    assert directives["a"].reasons == (
        'hot: gpu_temperature_celsius{gpu="0"} tripped when it stopped reporting; '
        "held until below 80; now 82",)


def test_after_a_reload_moved_the_line_the_reason_names_the_line_it_crossed() -> None:
    run = Run(rule(above=80, clear_below=70, **{"for": 0}))
    run.feed(gpu_temps(0, gpu0=85))
    new = [rule(above=90, clear_below=70, **{"for": 0})]
    run.states, run.rules = carry_over(run.rules, new, run.states), new
    run.feed(gpu_temps(1, gpu0=85))
    directives, _ = decide(run.rules, run.states, [job("a", "gpu0")])
    assert directives["a"].reasons == (
        'hot: gpu_temperature_celsius{gpu="0"} tripped above 80 at 85; held until below 70; '
        "now 85",)


def test_reload_keeps_states_of_unchanged_rules() -> None:
    old = [rule(**{"for": 0}), rule(name="other", **{"for": 0})]
    run = Run(*old)
    run.feed(gpu_temps(0, gpu0=90, gpu1=90))
    new = [rule(above=95, clear_below=80, **{"for": 0}),  # same name, new threshold
           rule(name="other", metric="gpu_utilization_ratio", above=0.5, clear_below=0.4),
           rule(name="narrowed", **{"for": 0})]
    kept = carry_over(old, new, run.states)
    assert set(kept) == {"hot"}
    assert kept["hot"][(("gpu", "0"),)].phase is Phase.TRIPPED
    narrowed = carry_over(old, [rule(match={"gpu": "1"}, **{"for": 0})], run.states)
    assert list(narrowed["hot"]) == [(("gpu", "1"),)]


def test_rules_view() -> None:
    run = Run(rule(**{"for": 0}), rule(name="idle", metric="memory_used_ratio", above=0.9,
                                       clear_below=0.8))
    run.feed(gpu_temps(10, gpu0=88))
    view = rule_states_view(run.rules, run.states, wall_offset=1000.0)
    assert view[0] == {"name": "hot", "series": 'gpu_temperature_celsius{gpu="0"}',
                       "labels": {"gpu": "0"}, "state": "tripped", "clearing": False,
                       "missing": False, "value": 88.0, "since": 1010.0, "action": "pause",
                       "metric": "gpu_temperature_celsius", "direction": "above",
                       "threshold": 85.0, "clear_threshold": 80.0}
    assert view[1]["name"] == "idle" and view[1]["series"] is None and view[1]["state"] == "ok"


# ---- hold rules (CONTRACT section 8) ----

def hold(**fields: Any) -> RuleConfig:
    base = {"name": "gpu-hold", "metric": "gpu_temperature_celsius", "action": "hold",
            "target": 80.0}
    base.update(fields)
    return parse_config({"rules": [base]}).rules[0]


G0 = (("gpu", "0"),)


def test_a_hold_rule_never_trips_and_keeps_a_missing_series() -> None:
    run = Run(hold())
    run.feed(gpu_temps(0, gpu0=95))
    assert run.phase(name="gpu-hold") is Phase.OK
    assert run.states["gpu-hold"][G0].value == 95
    run.feed(gpu_temps(1))
    state = run.states["gpu-hold"][G0]
    assert state.missing and state.value is None, "kept: its loop holds its last output"


def test_a_hold_rule_slows_by_its_loops_speed_and_says_why() -> None:
    run = Run(hold())
    run.feed(gpu_temps(0, gpu0=81.2))
    jobs = [job("a", "gpu0"), job("b", "gpu1")]
    directives, caps = decide(run.rules, run.states, jobs, {"gpu-hold": {G0: 0.8301}})
    assert (directives["a"].action, directives["a"].speed) == (Action.SLOW, 0.83)
    assert directives["a"].reasons == (
        'gpu-hold: holding gpu_temperature_celsius{gpu="0"} at 80 (now 81.2): speed 0.83',)
    assert directives["b"] == RUN and caps == {}
    full, _ = decide(run.rules, run.states, jobs, {"gpu-hold": {G0: 0.9999}})
    assert full["a"] == RUN, "full speed: no directive"
    stopped, _ = decide(run.rules, run.states, jobs, {"gpu-hold": {G0: 0.0}})
    assert stopped["a"].action is Action.PAUSE, "speed 0 is a pause"


def test_a_hold_rule_honours_max_priority() -> None:
    run = Run(hold(max_priority=5))
    run.feed(gpu_temps(0, gpu0=85))
    directives, _ = decide(run.rules, run.states, [job("low", "gpu0"),
                                                   job("high", "gpu0", priority=6)],
                           {"gpu-hold": {G0: 0.5}})
    assert directives["low"].speed == 0.5 and directives["high"] == RUN


def test_a_tripping_pause_wins_over_a_hold_slow() -> None:
    run = Run(hold(), rule(name="stop", above=90, clear_below=85, **{"for": 0}))
    run.feed(gpu_temps(0, gpu0=85))
    loops = {"gpu-hold": {G0: 0.6}}
    directives, _ = decide(run.rules, run.states, [job("a", "gpu0")], loops)
    assert (directives["a"].action, directives["a"].rules) == (Action.SLOW, ("gpu-hold",))
    run.feed(gpu_temps(1, gpu0=92))
    directives, _ = decide(run.rules, run.states, [job("a", "gpu0")], loops)
    assert directives["a"].action is Action.PAUSE
    assert set(directives["a"].rules) == {"gpu-hold", "stop"}


def test_a_hold_via_power_limit_sets_the_limit_and_never_the_job() -> None:
    run = Run(hold(via="power_limit"), rule(name="cap", action="power_cap",
                                            power_cap_watts=150, **{"for": 0}))
    run.rules.pop()
    run.feed(gpu_temps(0, gpu0=83))
    ranges = {"0": (100.0, 300.0)}
    directives, caps = decide(run.rules, run.states, [job("a", "gpu0")],
                              {"gpu-hold": {G0: 0.25}}, ranges)
    assert directives["a"] == RUN
    assert caps["gpu0"].watts == 150 and caps["gpu0"].rules == ("gpu-hold",)
    assert "power limit 150 W (speed 0.25)" in caps["gpu0"].reasons[0]
    assert decide(run.rules, run.states, [job("a", "gpu0")], {"gpu-hold": {G0: 1.0}},
                  ranges)[1] == {}, "full speed: the limit goes back"
    assert decide(run.rules, run.states, [], {"gpu-hold": {G0: 0.25}}, ranges)[1] == {}
    assert decide(run.rules, run.states, [job("a", "gpu0")], {"gpu-hold": {G0: 0.25}},
                  {})[1] == {}, "no range read: nothing set"


def test_hold_loops_run_per_series_and_slow_a_hot_device() -> None:
    run = Run(hold())
    loops: HoldLoops = {}
    jobs = [job("a", "gpu0")]
    for t in range(40):
        run.feed(gpu_temps(t * 0.5, gpu0=90, gpu1=90))
        loops = step_holds(run.rules, loops, run.states,
                           lambda r, labels: labels == G0, t * 0.5)
    assert set(loops["gpu-hold"]) == {G0}, "gpu1 has no job: no loop"
    speed = outputs(loops)["gpu-hold"][G0]
    assert speed < 0.5
    directives, _ = decide(run.rules, run.states, jobs, outputs(loops))
    assert directives["a"].action in (Action.SLOW, Action.PAUSE)
    # a missing reading holds the last output
    run.feed(gpu_temps(20.5))
    loops = step_holds(run.rules, loops, run.states, lambda r, labels: True, 20.5)
    assert outputs(loops)["gpu-hold"][G0] == speed


def test_a_reload_keeps_the_loops_of_a_hold_rule_with_the_same_target() -> None:
    old = [hold()]
    loops: HoldLoops = {"gpu-hold": {G0: start_hold(0.5)}}
    assert carry_holds(old, [hold(min_speed=0.2)], loops)["gpu-hold"][G0].speed == 0.5
    assert carry_holds(old, [hold(target=70)], loops) == {}, "a new target starts afresh"
    assert carry_holds(old, [hold(via="power_limit")], loops) == {}
    assert carry_holds(old, [], loops) == {}, "removed"
    assert carry_holds(old, [hold(match={"gpu": "1"})], loops) == {"gpu-hold": {}}


def test_the_rules_view_of_a_hold_rule() -> None:
    run = Run(hold())
    (empty,) = rule_states_view(run.rules, run.states, 0.0)
    assert empty["target"] == 80 and empty["output"] is None and empty["threshold"] is None
    run.feed(gpu_temps(0, gpu0=85))
    (entry,) = rule_states_view(run.rules, run.states, 0.0, {"gpu-hold": {G0: 0.7}})
    assert (entry["target"], entry["output"], entry["via"]) == (80, 0.7, "speed")
    assert entry["direction"] is None and entry["value"] == 85
