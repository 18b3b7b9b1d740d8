"""The status model `governor status` and `governor top` both draw: parsed once from the
/v1/status JSON, as tolerant of an absent or null key as the renderers need it to be."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from rich.console import Console

from governor.cli import report, top
from governor.cli.status_model import Job, Readings, RuleSeries, Sampler, Status


def status_json() -> dict[str, Any]:
    package = {"chip": "platform_coretemp_0", "sensor": "Package id 0"}
    return {
        "sequence": 7, "taken_at": 1_700_000_000,
        "readings": [
            {"metric": "cpu_utilization_ratio", "labels": {"cpu": "0"}, "value": 0.25},
            {"metric": "cpu_utilization_ratio", "labels": {"cpu": "1"}, "value": 1},
            {"metric": "cpu_temperature_celsius", "labels": package, "value": 95},
            {"metric": "gpu_temperature_celsius", "labels": {"gpu": "0"}, "value": 88.0},
        ],
        "samplers": [
            {"name": "cpu", "state": "ok", "duration_seconds": 0.002, "error": None,
             "problems": [], "retry_at": None},
            {"name": "amdgpu", "state": "error", "duration_seconds": 0.8,
             "error": "timed out", "problems": ["card1: unreadable"], "retry_at": 1_700_000_005},
        ],
        "rules": [
            {"name": "cpu-hot", "series": "cpu_temperature_celsius{...}", "labels": package,
             "state": "tripped", "value": 95, "since": 1_699_999_925, "action": "pause",
             "metric": "cpu_temperature_celsius", "direction": "above", "threshold": 80,
             "clear_threshold": 70, "clearing": False, "missing": False},
            {"name": "gpu-cold", "series": 'gpu_temperature_celsius{gpu="0"}',
             "labels": {"gpu": "0"}, "state": "ok", "metric": "gpu_temperature_celsius",
             "direction": "below", "enforceable": False,
             "not_enforceable_because": "needs root"},
            {"name": "cpu-hot", "series": None, "labels": {}, "state": "ok",
             "metric": "cpu_temperature_celsius"},
        ],
        "jobs": [
            {"id": "a1", "name": "trainer", "pid": 4242, "mode": "signal", "devices": ["0"],
             "priority": 2, "state": "paused", "speed": 0, "reasons": ["cpu-hot: pause"],
             "held_by_operator": True, "error": None},
        ],
        "power_caps": {"0": 250},
        "gpu_pids": {"0": [11, 12]},
        "audit": {"path": "/var/lib/governor/audit.jsonl", "ok": False, "errors": 3,
                  "last_error": "disk full"},
    }


def test_a_whole_status_is_parsed_into_typed_fields() -> None:
    status = Status.parse(status_json())
    assert (status.sequence, status.taken_at) == (7, 1_700_000_000.0)
    assert [r.value for r in status.readings.of("cpu_utilization_ratio")] == [0.25, 1.0]
    assert status.samplers[1] == Sampler("amdgpu", "error", 0.8, "timed out",
                                         ("card1: unreadable",), 1_700_000_005.0)
    assert status.jobs == (Job("a1", "trainer", "paused", pid=4242, mode="signal",
                               devices=("0",), priority="2", speed=0.0,
                               reasons=("cpu-hot: pause",), held_by_operator=True),)
    hot, cold, unseen = status.rules
    assert (hot.above, hot.threshold, hot.since, hot.enforceable) == (True, 80.0,
                                                                       1_699_999_925.0, True)
    assert (cold.above, cold.enforceable, cold.not_enforceable_because) == (
        False, False, "needs root")
    assert unseen.series is None and unseen.key is None
    assert dict(status.power_caps) == {"0": 250.0}
    assert dict(status.gpu_pids) == {"0": (11, 12)}
    assert status.audit is not None and not status.audit.ok and status.audit.errors == 3


def test_readings_are_grouped_by_metric_and_looked_up_by_labels() -> None:
    readings = Status.parse(status_json()).readings
    assert "cpu_temperature_celsius" in readings and "gpu_power_watts" not in readings
    assert readings.value("cpu_utilization_ratio", cpu="1") == 1.0
    assert readings.value("cpu_utilization_ratio") == 0.25, "no labels: the first reading"
    assert readings.value("cpu_temperature_celsius", chip="platform_coretemp_0") == 95.0
    assert readings.value("cpu_utilization_ratio", cpu="9") is None
    assert readings.value("gpu_power_watts", gpu="0") is None
    assert readings.of("gpu_power_watts") == ()


def test_a_reading_knows_the_rule_series_watching_it_whatever_the_label_order() -> None:
    status = Status.parse(status_json())
    watchers = status.watchers("cpu_temperature_celsius",
                               {"sensor": "Package id 0", "chip": "platform_coretemp_0"})
    assert [r.name for r in watchers] == ["cpu-hot"], "a series with no reading watches none"
    assert status.watchers("gpu_temperature_celsius", {"gpu": "1"}) == ()
    assert {name: len(series) for name, series in status.rules_by_name().items()} == {
        "cpu-hot": 2, "gpu-cold": 1}


@pytest.mark.parametrize("data", [
    {},
    {"readings": None, "samplers": None, "rules": None, "jobs": None, "power_caps": None,
     "gpu_pids": None, "audit": None, "sequence": None, "taken_at": None},
])
def test_absent_or_null_keys_are_an_empty_status(data: dict[str, Any]) -> None:
    status = Status.parse(data)
    assert status == Status()
    assert status.readings == Readings() and status.audit is None
    assert status.rules_by_name() == {}


def test_partial_entries_take_the_defaults_the_renderers_show() -> None:
    status = Status.parse({
        "taken_at": 5,
        "samplers": [{"name": "hwmon"}],
        "rules": [{"name": "r", "state": "pending", "series": "x", "labels": None,
                   "metric": None, "direction": None}],
        "jobs": [{"id": "j", "name": "n", "state": "running", "mode": "", "error": ""}],
        "audit": {"path": "/x"},
        "gpu_pids": {"1": None},
    })
    assert status.sequence is None and status.taken_at == 5.0
    assert status.samplers == (Sampler("hwmon", "?", 0.0),)
    rule = status.rules[0]
    assert rule == RuleSeries("r", "pending", series="x", above=False)
    assert rule.key is None, "a series without a metric watches no reading"
    assert status.jobs == (Job("j", "n", "running"),)
    assert status.audit is not None and status.audit.ok
    assert dict(status.gpu_pids) == {"1": ()}


def test_a_reading_without_its_value_does_not_parse() -> None:
    """The keys every renderer indexed directly are still required."""
    with pytest.raises(KeyError):
        Status.parse({"readings": [{"metric": "memory_used_ratio", "labels": {}}]})


def test_both_renderers_draw_the_json_and_its_model_alike() -> None:
    """`governor status` parses once and hands the model on; `top` parses the poller's
    JSON itself: either way the same text."""
    data = status_json()
    model = Status.parse(data)
    assert report.render(data) == report.render(model)
    assert "  cpu1         100.0%" in report.render(model).splitlines()

    def drawn(status: dict[str, Any] | Status) -> str:
        console = Console(record=True, width=160, file=io.StringIO())
        console.print(top.render(status, where="here", width=160))
        return console.export_text()
    assert drawn(data) == drawn(model)
    assert "audit log /var/lib/governor/audit.jsonl: 3 write errors" in drawn(model)


def test_a_hold_rule_parses_and_status_shows_its_target_reading_and_output() -> None:
    entry = {"name": "gpu-hold", "state": "ok", "series": 'gpu_temperature_celsius{gpu="0"}',
             "metric": "gpu_temperature_celsius", "labels": {"gpu": "0"}, "value": 81.2,
             "action": "hold", "direction": None, "threshold": None, "clear_threshold": None,
             "target": 80.0, "output": 0.83, "via": "speed"}
    rule = RuleSeries.parse(entry)
    assert rule.holds and rule.holding_back and (rule.target, rule.output) == (80.0, 0.83)
    table = report.render_rules([rule])
    assert "81.2" in table and "hold at 80: output 0.83" in table
    limited = RuleSeries.parse({**entry, "via": "power_limit", "output": 1.0})
    assert not limited.holding_back
    assert "hold at 80 via power limit: output 1.00" in report.render_rules([limited])


def test_a_job_resumed_outside_governor_reads_running_with_the_pause_it_overrides() -> None:
    """`governor jobs` and `governor status` tell an operator the job runs, not that it is
    paused, while the reasons still say what governor would hold it for."""
    entry = {"id": "s1", "name": "fought", "state": "running", "speed": 1.0, "mode": "suspend",
             "reasons": ["gpu-hot: 95 > 85"], "held_by_operator": False, "source": "slurm",
             "scheduler_id": "42", "user": "ana", "outside": "resumed"}
    fought = Job.parse(entry)
    assert fought.resumed_outside and fought.state_text == "running (resumed outside governor)"
    both = Job.parse({**entry, "held_by_operator": True})
    assert both.state_text == "running (resumed outside governor; operator)"
    plain = Job.parse({**entry, "outside": None, "state": "paused", "speed": 0})
    assert not plain.resumed_outside and plain.state_text == "paused"

    header, *rows = [re.split(r"\s{2,}", line.strip())
                     for line in report.render_jobs([fought, plain]).splitlines()]
    assert [dict(zip(header, row, strict=True)) for row in rows] == [
        {"id": "s1", "name": "fought", "from": "slurm 42", "user": "ana", "pid": "-",
         "mode": "suspend", "devices": "-", "prio": "-",
         "state": "running (resumed outside governor)", "speed": "1",
         "reasons": "gpu-hot: 95 > 85"},
        {"id": "s1", "name": "fought", "from": "slurm 42", "user": "ana", "pid": "-",
         "mode": "suspend", "devices": "-", "prio": "-", "state": "paused", "speed": "0",
         "reasons": "gpu-hot: 95 > 85"}]
    data = {**status_json(), "jobs": [entry]}
    assert "running (resumed outside governor)" in "\n".join(
        report.render_jobs(Status.parse(data).jobs).splitlines()[1:])
