"""The exposition: built from the last snapshot, base units, and clean under promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest

from governor.catalog import PREFIX, SAMPLED
from governor.config import RuleConfig
from governor.control.view import ControlView, JobView
from governor.jobs.model import Mode
from governor.policy.directives import rule_states_view
from governor.service.metrics import DaemonMetrics
from governor.snapshot import SamplerHealth, SamplerState, Snapshot, SnapshotStore, reading
from tests.support.fake_nvml import FakeNvml, h100

ACCEPTED_SUFFIXES = ("_ratio", "_celsius", "_watts", "_bytes", "_hertz", "_seconds", "_total",
                     "_info", "_up", "_state", "_active", "_paused", "_resumed")
#: counts of things, in the plural, are a base unit too (node_exporter: node_load1 has none)
COUNT_UNITS = ("_tasks",)


def snapshot(*readings: object, samplers: tuple[SamplerHealth, ...] = ()) -> Snapshot:
    return Snapshot(1, 0.0, 0.0, tuple(readings), samplers, MappingProxyType({}))  # type: ignore[arg-type]


def full_exposition() -> str:
    """Every metric the catalog knows, with a sampler of each state."""
    from governor.sampling.nvml import NvmlSampler

    # The Python fake, not the C one: these are checks of the exposition, which must run
    # on a machine without a compiler (the C fake skips there), and this helper is called
    # outside fixtures. The C fake gives the same readings (tests/test_nvml_sampler.py, and
    # the golden exposition of tests/test_daemon_e2e.py).
    gpus = NvmlSampler(nvml=FakeNvml({"gpus": [h100(0), h100(1)]})).sample().readings
    examples = {
        "cpu_utilization_ratio": {"cpu": "0"}, "cpu_temperature_celsius":
        {"chip": "platform_coretemp_0", "sensor": "Core 0"}, "hwmon_temperature_celsius":
        {"chip": "nvme_nvme0", "sensor": "Composite"}, "memory_used_ratio": {},
        "pressure_stall_ratio": {"resource": "cpu", "kind": "some"},
        "load_average_tasks": {"window": "1m"},
        "accelerator_utilization_ratio": {"device": "card0", "driver": "amdgpu"},
        "accelerator_temperature_celsius": {"device": "card0", "driver": "amdgpu",
                                            "sensor": "edge"},
        "accelerator_power_watts": {"device": "card0", "driver": "amdgpu"},
        "accelerator_memory_used_bytes": {"device": "card0", "driver": "amdgpu"},
        "accelerator_memory_total_bytes": {"device": "card0", "driver": "amdgpu"},
    }
    readings = [reading(m, 1.0, **labels) for m, labels in examples.items()] + list(gpus)
    assert {r.metric for r in readings} == set(SAMPLED), "every catalog metric is exercised"
    samplers = (
        SamplerHealth("cpu", SamplerState.OK, 0.001),
        SamplerHealth("hwmon", SamplerState.ERROR, 0.002, "timed out"),
        SamplerHealth("nvml", SamplerState.UNAVAILABLE, 0.0, "no driver"),
    )
    store = SnapshotStore()
    store.publish(snapshot(*readings, samplers=samplers))
    metrics = DaemonMetrics(store)
    metrics.rounds.inc()
    metrics.sampler_errors.labels("hwmon").inc()
    metrics.watch(controller_with(
        [rule(f"on-{name}", name, above=0.5) for name in SAMPLED],
        jobs=[job("a", "running"), job("b", "slowed", speed=0.5, held_by=("cpu-hot",)),
              job("c", "paused", speed=0.0, held_by=("operator",))],
        power_caps={"0": 250.0}))
    return metrics.render().decode()


def rule(name: str, metric: str, **lines: float) -> RuleConfig:
    return RuleConfig.model_validate({"name": name, "metric": metric, **lines})


def job(job_id: str, state: str, speed: float = 1.0, held_by: tuple[str, ...] = (),
        name: str = "trainer") -> dict[str, Any]:
    return {"id": job_id, "name": name, "state": state, "speed": speed, "held_by": held_by}


def controller_with(rules: list[RuleConfig], jobs: list[dict[str, Any]] | None = None,
                    power_caps: dict[str, float] | None = None) -> Any:
    """What ControlCollector reads of a Controller: its published view and power caps,
    the rules' entries as /v1/rules has them."""
    jobs = jobs or []
    view = ControlView(
        jobs=tuple(job_view(**{k: v for k, v in j.items() if k != "held_by"}) for j in jobs),
        rules=tuple(rule_states_view(rules, {}, 0.0)),
        held_by={j["id"]: j["held_by"] for j in jobs},
    )
    return SimpleNamespace(view=view, power_caps=power_caps or {})


def job_view(id: str, name: str, state: str, speed: float,
             outside: str | None = None) -> JobView:
    """A job of the view, with what the metrics read (the rest: a cooperative job's)."""
    return JobView(id=id, name=name, pid=None, pid_started_at=None, cgroup=None,
                   mode=Mode.COOPERATIVE, devices=(), devices_from=None, priority=0,
                   state=state, speed=speed, reasons=(), held_by_operator=False,
                   registered_at=0.0, owner_uid=None, gone_at=None, outside=outside)


def names(exposition: str) -> list[str]:
    return re.findall(r"^# TYPE (\S+) ", exposition, re.MULTILINE)


def test_every_metric_name_ends_in_a_base_unit_or_accepted_suffix() -> None:
    found = names(full_exposition())
    assert len(found) >= len(SAMPLED) + 4
    for name in found:
        assert name.startswith(PREFIX), name
        assert name.endswith(ACCEPTED_SUFFIXES + COUNT_UNITS), f"{name} has no unit suffix"
        assert not re.search(r"_(percent|mhz|celcius|milli\w*|kb|mb)(_|$)", name), name


def test_catalog_names_carry_units_too() -> None:
    for name in SAMPLED:
        assert name.endswith(ACCEPTED_SUFFIXES + COUNT_UNITS), name


def test_unavailable_samplers_have_no_series_and_failed_ones_are_zero() -> None:
    text = full_exposition()
    assert 'governor_sampler_up{sampler="cpu"} 1.0' in text
    assert 'governor_sampler_up{sampler="hwmon"} 0.0' in text
    assert 'sampler="nvml"' not in text
    assert 'governor_sampler_errors_total{sampler="hwmon"} 1.0' in text


def test_a_vanished_gpu_leaves_no_stale_series() -> None:
    store = SnapshotStore()
    metrics = DaemonMetrics(store)
    store.publish(snapshot(reading("gpu_temperature_celsius", 70, gpu="0"),
                           reading("gpu_temperature_celsius", 71, gpu="1")))
    assert 'gpu="1"' in metrics.render().decode()
    store.publish(snapshot(reading("gpu_temperature_celsius", 70, gpu="0")))
    text = metrics.render().decode()
    assert 'governor_gpu_temperature_celsius{gpu="0"} 70.0' in text
    assert 'gpu="1"' not in text


def test_build_info() -> None:
    from governor import __version__

    text = DaemonMetrics(SnapshotStore()).render().decode()
    assert f'governor_build_info{{version="{__version__}"}} 1.0' in text


def test_no_created_series() -> None:
    assert "_created" not in full_exposition()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_check_metrics_finds_nothing() -> None:
    result = subprocess.run(["promtool", "check", "metrics"], input=full_exposition(),
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_a_scrape_with_nothing_changed_reuses_the_rendered_bytes() -> None:
    store = SnapshotStore()
    metrics = DaemonMetrics(store)
    store.publish(snapshot(reading("memory_used_ratio", 0.5)))
    first = metrics.render()
    assert metrics.render() is first, "nothing changed: the same bytes, not rendered again"
    store.publish(snapshot(reading("memory_used_ratio", 0.25)))
    second = metrics.render()
    assert "governor_memory_used_ratio 0.25" in second.decode()
    assert metrics.render() is second


def test_the_cache_follows_the_daemons_own_counters_and_gauges() -> None:
    store = SnapshotStore()
    metrics = DaemonMetrics(store)
    store.publish(snapshot())
    metrics.render()
    metrics.rounds.inc()
    assert "governor_rounds_total 1.0" in metrics.render().decode()
    metrics.sampler_errors.labels("hwmon").inc()
    assert 'governor_sampler_errors_total{sampler="hwmon"} 1.0' in metrics.render().decode()
    metrics.round_lateness.set(0.125)
    assert "governor_round_lateness_seconds 0.125" in metrics.render().decode()
    metrics.count_action("pause", "cpu-hot")
    assert ('governor_actions_total{action="pause",rule="cpu-hot"} 1.0'
            in metrics.render().decode())


def test_every_metric_of_the_daemon_invalidates_the_cache() -> None:
    """A plain Counter or Gauge added to DaemonMetrics would be served stale from the
    cache: the daemon's own metrics must be the tracked kinds."""
    from prometheus_client.metrics import MetricWrapperBase

    from governor.service.metrics import TrackedCounter, TrackedGauge

    own = [m for m in vars(DaemonMetrics(SnapshotStore())).values()
           if isinstance(m, MetricWrapperBase)]
    assert len(own) >= 8
    for metric in own:
        assert isinstance(metric, TrackedCounter | TrackedGauge), metric


def test_the_cache_follows_the_controllers_view() -> None:
    store = SnapshotStore()
    metrics = DaemonMetrics(store)
    job = {"id": "abc", "name": "trainer", "state": "running", "speed": 1.0}
    controller = SimpleNamespace(view=ControlView(jobs=(job_view(**job),)), power_caps={})
    metrics.watch(controller)  # type: ignore[arg-type]
    assert 'governor_job_paused{id="abc",job="trainer"} 0.0' in metrics.render().decode()
    controller.view = ControlView(jobs=(job_view(**{**job, "state": "paused", "speed": 0.0}),))
    assert 'governor_job_paused{id="abc",job="trainer"} 1.0' in metrics.render().decode()
    controller.power_caps = {"0": 250.0}
    assert 'governor_gpu_power_cap_watts{gpu="0"} 250.0' in metrics.render().decode()
    controller.view = ControlView()
    assert 'job="trainer"' not in metrics.render().decode(), "no stale series after a change"


def test_problems_are_counted_per_sampler() -> None:
    from governor.sampling.base import SampleResult
    from governor.sampling.runner import SamplerRunner
    from governor.service.loop import SamplingLoop

    class Faulty:
        name = "hwmon"

        def sample(self) -> SampleResult:
            return SampleResult([reading("memory_used_ratio", 0.5)],
                                problems=["a: not a number", "b: stopped reporting"])

        def close(self) -> None:
            pass

    store = SnapshotStore()
    metrics = DaemonMetrics(store)
    loop = SamplingLoop(SamplerRunner([Faulty()], timeout=1.0), store, metrics, 1.0)
    loop.run_once()
    loop.run_once()
    text = metrics.render().decode()
    assert 'governor_sampler_problems_total{sampler="hwmon"} 4.0' in text
    assert 'governor_sampler_up{sampler="hwmon"} 1.0' in text
    loop.runner.close()


def samples(exposition: str, name: str) -> dict[str, float]:
    """`name{labels}` -> value, for one family."""
    found = {}
    for line in exposition.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, value = line.rsplit(" ", 1)
            found[series] = float(value)
    return found


def test_rule_thresholds_one_family_per_unit_with_trip_and_clear_lines() -> None:
    rules = [
        rule("cpu-hot", "cpu_temperature_celsius", above=80, clear_below=70),
        rule("gpu-hot", "governor_gpu_temperature_celsius", above=85),
        rule("idle", "gpu_utilization_ratio", below=0.05, clear_above=0.2),
        rule("gpu-lost", "gpu_info", below=0.5),
        rule("brake", "gpu_clock_event_active", above=0.5),
        rule("load", "load_average_tasks", above=32),
    ]
    metrics = DaemonMetrics(SnapshotStore())
    metrics.watch(controller_with(rules))
    text = metrics.render().decode()
    assert samples(text, "governor_rule_threshold_celsius") == {
        'governor_rule_threshold_celsius{line="trip",metric="cpu_temperature_celsius",'
        'rule="cpu-hot"}': 80.0,
        'governor_rule_threshold_celsius{line="clear",metric="cpu_temperature_celsius",'
        'rule="cpu-hot"}': 70.0,
        'governor_rule_threshold_celsius{line="trip",metric="gpu_temperature_celsius",'
        'rule="gpu-hot"}': 85.0,
        'governor_rule_threshold_celsius{line="clear",metric="gpu_temperature_celsius",'
        'rule="gpu-hot"}': 85.0,
    }, "no clear_below: the rule clears where it trips"
    assert samples(text, "governor_rule_threshold_ratio") == {
        'governor_rule_threshold_ratio{line="trip",metric="gpu_utilization_ratio",'
        'rule="idle"}': 0.05,
        'governor_rule_threshold_ratio{line="clear",metric="gpu_utilization_ratio",'
        'rule="idle"}': 0.2,
    }
    assert samples(text, "governor_rule_threshold_active") == {
        'governor_rule_threshold_active{line="trip",metric="gpu_info",rule="gpu-lost"}': 0.5,
        'governor_rule_threshold_active{line="clear",metric="gpu_info",rule="gpu-lost"}': 0.5,
        'governor_rule_threshold_active{line="trip",metric="gpu_clock_event_active",'
        'rule="brake"}': 0.5,
        'governor_rule_threshold_active{line="clear",metric="gpu_clock_event_active",'
        'rule="brake"}': 0.5,
    }, "a presence flag is not an _info series: its threshold joins the 0/1 flags"
    assert len(samples(text, "governor_rule_threshold_tasks")) == 2
    assert "governor_rule_threshold_info" not in text
    for unit in ("watts", "bytes", "hertz"):
        assert f"# TYPE governor_rule_threshold_{unit} gauge" in text
        assert not samples(text, f"governor_rule_threshold_{unit}"), "only configured rules"


def test_a_rule_watching_many_series_has_one_pair_of_lines() -> None:
    from governor.policy.rules import Phase, SeriesState

    cpu_hot = rule("cpu-hot", "cpu_temperature_celsius", above=80, clear_below=70)
    states = {"cpu-hot": {(("chip", "c"), ("sensor", str(i))): SeriesState(Phase.OK, 0.0, 75.0)
                          for i in range(4)}}
    metrics = DaemonMetrics(SnapshotStore())
    metrics.watch(SimpleNamespace(view=ControlView(rules=tuple(rule_states_view(
        [cpu_hot], states, 0.0))), power_caps={}))  # type: ignore[arg-type]
    assert len(samples(metrics.render().decode(), "governor_rule_threshold_celsius")) == 2


def test_job_state_info_names_what_holds_each_job() -> None:
    metrics = DaemonMetrics(SnapshotStore())
    metrics.watch(controller_with([], jobs=[
        job("a1", "running"),
        job("b2", "slowed", 0.5, ("gpu-hot",), name="tuner"),
        job("c3", "paused", 0.0, ("cpu-hot", "operator"), name="search"),
        job("d4", "gone", name="finished"),
    ]))
    assert samples(metrics.render().decode(), "governor_job_state_info") == {
        'governor_job_state_info{id="a1",job="trainer",reason="",state="running"}': 1.0,
        'governor_job_state_info{id="b2",job="tuner",reason="gpu-hot",state="slowed"}': 1.0,
        'governor_job_state_info{id="c3",job="search",reason="cpu-hot, operator",'
        'state="paused"}': 1.0,
    }, "gone jobs have no series"


def test_a_job_resumed_outside_governor_is_running_and_flagged_until_the_pause_ends() -> None:
    """An administrator resumed a job a rule pauses: the job runs, and says why."""
    metrics = DaemonMetrics(SnapshotStore())
    metrics.watch(controller_with([], jobs=[
        {**job("a1", "running", held_by=("gpu-hot",), name="fought"), "outside": "resumed"},
        job("b2", "paused", 0.0, ("gpu-hot",), name="held"),
    ]))
    text = metrics.render().decode()
    assert samples(text, "governor_job_outside_resumed") == {
        'governor_job_outside_resumed{id="a1",job="fought"}': 1.0,
        'governor_job_outside_resumed{id="b2",job="held"}': 0.0,
    }
    assert 'governor_job_state_info{id="a1",job="fought",reason="",state="running"} 1.0' in text
    assert 'governor_job_paused{id="a1",job="fought"} 0.0' in text
    assert 'governor_job_speed_ratio{id="a1",job="fought"} 1.0' in text


def test_action_counters_start_at_zero_for_every_rule_and_the_operator() -> None:
    """rate() and increase() miss the first action of a counter born at 1."""
    metrics = DaemonMetrics(SnapshotStore())
    metrics.expect_actions([rule("cpu-hot", "cpu_temperature_celsius", above=80),
                            RuleConfig.model_validate({
                                "name": "cap", "metric": "gpu_temperature_celsius",
                                "above": 85, "action": "power_cap", "power_cap_watts": 250})])
    assert samples(metrics.render().decode(), "governor_actions_total") == {
        f'governor_actions_total{{action="{action}",rule="{name}"}}': 0.0
        for action, name in [("pause", "cpu-hot"), ("slow", "cpu-hot"), ("resume", "cpu-hot"),
                             ("power_cap", "cap"), ("restore", "cap"),
                             ("pause", "operator"), ("resume", "operator")]}


def test_hold_rules_export_their_output_and_target_and_no_lines() -> None:
    from governor.policy.rules import Phase, SeriesState

    held = RuleConfig.model_validate({"name": "gpu-hold", "metric": "gpu_temperature_celsius",
                                      "action": "hold", "target": 80})
    quiet = RuleConfig.model_validate({"name": "cpu-hold", "metric": "cpu_temperature_celsius",
                                       "action": "hold", "target": 70})
    states = {"gpu-hold": {(("gpu", "0"),): SeriesState(Phase.OK, 0.0, 83.0),
                           (("gpu", "1"),): SeriesState(Phase.OK, 0.0, 60.0)}}
    view = rule_states_view([held, quiet], states, 0.0, {"gpu-hold": {(("gpu", "0"),): 0.6}})
    metrics = DaemonMetrics(SnapshotStore())
    metrics.watch(SimpleNamespace(view=ControlView(rules=tuple(view)),  # type: ignore[arg-type]
                                  power_caps={}))
    text = metrics.render().decode()
    assert samples(text, "governor_rule_output_ratio") == {
        'governor_rule_output_ratio{rule="gpu-hold",series="gpu_temperature_celsius{gpu=\\"0\\"}"}':
        0.6,
        'governor_rule_output_ratio{rule="gpu-hold",series="gpu_temperature_celsius{gpu=\\"1\\"}"}':
        1.0,
    }, "a series without a loop (no job) is not held back"
    assert samples(text, "governor_rule_target_celsius") == {
        'governor_rule_target_celsius{metric="gpu_temperature_celsius",rule="gpu-hold"}': 80.0,
        'governor_rule_target_celsius{metric="cpu_temperature_celsius",rule="cpu-hold"}': 70.0,
    }
    assert not samples(text, "governor_rule_threshold_celsius"), "a hold rule has no lines"
    assert "governor_rule_target_ratio" not in text, "a family only for the units in use"
