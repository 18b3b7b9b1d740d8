"""exporters/grafana: the dashboard loads through file provisioning as it is, and every
query of every panel returns data from a real Prometheus that scrapes a real daemon.

Grafana itself is not installed, so the dashboard's JSON is checked for what provisioning
and the panels need (datasource variable, descriptions, units, no import placeholders).
The live test runs the daemon against the fixture sysfs tree and a fake NVML with two
GPUs, three real jobs that end up paused, slowed and running, and a Prometheus (the Debian
package) that scrapes it every second; then each panel query, with the dashboard's
variables substituted as Grafana would, goes to Prometheus's HTTP API.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import FIXTURES
from tests.support.c_nvml import CNvmlState
from tests.support.daemon import REPO, DaemonProcess
from tests.support.dashboards import (
    DATASOURCE,
    GRAFANA,
    PROVISIONING,
    Dashboard,
    check_panel,
    legend,
    promtool_parse_errors,
    regex_escape,
    substitute,
    variable_query,
)
from tests.support.fake_nvml import h100
from tests.support.processes import busy_child, eventually, stop
from tests.support.prometheus import PrometheusServer, prometheus_binary
from tests.support.stat_ticker import StatTicker
from tests.support.ttar import unpack

DASHBOARD = GRAFANA / "governor.json"
GOVERNOR = Dashboard(DASHBOARD)
ALERTS = REPO / "exporters" / "prometheus" / "alerts.yml"
ROOT = os.geteuid() == 0
#: the GPU power panel's cap: only a root daemon can set one
CAP_EXPR = "governor_gpu_power_cap_watts"
dashboard = GOVERNOR.board
panels = GOVERNOR.panels
targets = GOVERNOR.targets
variables = GOVERNOR.variables


# ------------------------------------------------------------------ the JSON, as Grafana needs it


def test_no_import_placeholders_so_provisioning_loads_it_as_is() -> None:
    text = DASHBOARD.read_text()
    assert "__inputs" not in text and "${DS_" not in text and "__requires" not in text
    board = dashboard()
    assert board["uid"] == "governor" and board["title"]
    assert "id" not in board or board["id"] is None, "an id would clash in another Grafana"


def test_the_variables() -> None:
    found = variables()
    datasource = found["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    for name, metric in (("instance", "governor_build_info"), ("gpu", "governor_gpu_info")):
        variable = found[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        assert variable["multi"] is True and variable["includeAll"] is True, name
        assert re.fullmatch(rf"label_values\({metric}(\{{.*\}})?, {name}\)",
                            variable_query(variable)), name
    assert '$instance' in variable_query(found["gpu"]), "the GPUs of the chosen instances"


def test_every_panel_has_the_datasource_variable_a_description_a_unit_and_queries() -> None:
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        check_panel(panel)
    for annotation in dashboard()["annotations"]["list"]:
        if annotation.get("builtIn"):
            continue
        assert annotation["datasource"] == DATASOURCE and annotation["expr"]


def test_rates_use_rate_interval_and_selectors_use_the_variables() -> None:
    for title, target in targets():
        expr = target["expr"]
        for window in re.findall(r"\b(?:rate|irate|increase)\([^\[]*\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", f"{title}: [{window}]"
        for selector in re.findall(r"governor_\w+\{([^}]*)\}", expr):
            assert 'instance=~"$instance"' in selector, f"{title}: {expr}"
        for selector in re.findall(r"governor_gpu_\w+\{([^}]*)\}", expr):
            assert 'gpu=~"$gpu"' in selector, f"{title}: {expr}"


def test_the_rows_and_what_they_show() -> None:
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert [r for r in rows if r in ("Host", "GPUs", "Jobs", "Governor")] == [
        "Host", "GPUs", "Jobs", "Governor"]
    by_title = {p["title"]: p for p in panels()}
    exprs = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in by_title.items()}
    assert "governor_rule_threshold_celsius" in exprs["CPU temperature"]
    assert "governor_rule_threshold_celsius" in exprs["GPU temperature"]
    assert "governor_gpu_power_limit_watts" in exprs["GPU power against its limit"]
    jobs = by_title["Job states"]
    assert jobs["type"] == "state-timeline" and "governor_job_state_info" in exprs["Job states"]
    assert any("reason" in t["legendFormat"] for t in jobs["targets"]), "the reason is shown"
    texts = {m["text"] for mapping in jobs["fieldConfig"]["defaults"]["mappings"]
             for m in mapping["options"].values()}
    assert texts == {"running", "slowed", "paused"}


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian: prometheus)")
def test_every_query_parses(tmp_path: Path) -> None:
    """promtool parses each query, its variables substituted as Grafana would."""
    values = {"instance": ".*", "gpu": ".*"}
    exprs = [substitute(expr, values) for _, _, expr in GOVERNOR.queries()]
    assert not promtool_parse_errors(exprs, tmp_path)


def test_every_metric_the_dashboard_reads_exists() -> None:
    """A misspelt metric would show "No data" for ever: each name must be one the
    daemon exposes (the golden exposition lists every family) or Prometheus's `up`."""
    golden = (REPO / "tests" / "golden" / "metrics.prom").read_text()
    families = set(re.findall(r"^# TYPE (\S+) ", golden, re.MULTILINE))
    exprs = [t["expr"] for _, t in targets()] + [variable_query(v) for v in
                                                  variables().values() if v["type"] == "query"]
    for expr in exprs:
        for name in re.findall(r"\b(governor_\w+)", expr):
            assert name in families, f"{name} in {expr}"


def test_provisioning_files_point_at_the_documented_places() -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "governor.yml").read_text())
    assert datasources["apiVersion"] == 1
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "governor.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    readme = (REPO / "README.md").read_text()
    assert path in readme, "README says where to copy governor.json"
    assert "provisioning/dashboards" in readme and "provisioning/datasources" in readme


# ------------------------------------------------------------------ every query, live

needs_prometheus = pytest.mark.skipif(
    prometheus_binary() is None, reason="prometheus is not installed (Debian: prometheus)")

CPU_PACKAGE = "devices/platform/coretemp.0/hwmon/hwmon0/temp1_input"
RULES = [
    {"name": "cpu-hot", "metric": "cpu_temperature_celsius",
     "match": {"chip": "platform_coretemp_0", "sensor": "Package id 0"},
     "above": 80.0, "for": 0, "clear_below": 70.0, "clear_for": 0, "action": "pause",
     "max_priority": 10},
    {"name": "gpu-hot", "metric": "gpu_temperature_celsius", "above": 80.0, "for": 0,
     "clear_below": 75.0, "action": "slow", "speed": 0.5},
    {"name": "gpu-cap", "metric": "gpu_temperature_celsius", "match": {"gpu": "0"},
     "above": 85.0, "for": 0, "clear_below": 80.0, "action": "power_cap",
     "power_cap_watts": 250},
    {"name": "nvme-hot", "metric": "hwmon_temperature_celsius",
     "match": {"chip": "nvme_nvme0", "sensor": "Composite"}, "above": 70.0,
     "clear_below": 65.0, "action": "slow", "speed": 0.5},
]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[DaemonProcess, PrometheusServer]]:
    """A daemon with a job of each state, scraped by a Prometheus that runs alerts.yml;
    one for the module, as it takes a while to build."""
    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (Debian: prometheus)")
    root = tmp_path_factory.mktemp("grafana")
    unpack(FIXTURES / "sys.ttar", root)
    sys_tree, proc_tree = root / "sys", root / "proc"
    shutil.copytree(FIXTURES / "proc", proc_tree, symlinks=True)
    c_nvml = CNvmlState(root / "nvml.state")
    gpus = {"gpus": [h100(0), h100(1)]}
    c_nvml.write(gpus)
    (root / "daemon").mkdir()
    (root / "prometheus").mkdir()
    d = DaemonProcess(root / "daemon", {
        "daemon": {"interval": 0.5},
        "sources": {"sysfs_root": str(sys_tree), "procfs_root": str(proc_tree)},
        "rules": RULES}, c_nvml=c_nvml)
    children: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(StatTicker(proc_tree))
        d.start()
        stack.callback(d.stop)
        stack.callback(lambda: list(map(stop, children)))
        children += [busy_child(), subprocess.Popen(["sleep", "600"]),
                     subprocess.Popen(["sleep", "600"])]
        trainer = d.register(name="trainer", pid=children[0].pid, devices=["gpu0"])
        tuner = d.register(name="tuner", pid=children[1].pid, devices=["gpu1"], priority=50)
        idle = d.register(name="idle", pid=children[2].pid, priority=50)
        prom = stack.enter_context(PrometheusServer(
            root / "prometheus", [f"127.0.0.1:{d.port}"], rule_files=[ALERTS]))
        prom.wait_for('governor_job_state_info{state="running"}', what="a first scrape")
        (sys_tree / CPU_PACKAGE).write_text("95000\n")
        gpus["gpus"][0].update(temperature=90, clock_events=0x4 | 0x20)
        gpus["gpus"][1].update(temperature=82)
        c_nvml.write(gpus)
        eventually(lambda: [d.job(j["id"])["state"] for j in (trainer, tuner, idle)]
                   == ["paused", "slowed", "running"], timeout=20,
                   what="the jobs are held by the hot sensors")
        actions = 3 if ROOT else 2  # pause, slow and (root) power_cap
        prom.wait_for(f"count(increase(governor_actions_total[1m]) > 0) >= {actions}",
                      what="every action scraped before and after it was taken")
        yield d, prom


def instance_of(prom: PrometheusServer) -> str:
    (series,) = prom.query("governor_build_info")
    return str(series["metric"]["instance"])


@needs_prometheus
def test_every_panel_query_returns_data_from_a_real_prometheus(
        live: tuple[DaemonProcess, PrometheusServer]) -> None:
    _, prom = live
    instance = instance_of(prom)
    assert prom.api("label/instance/values", **{"match[]": "governor_build_info"}) == [
        instance], "the instance variable's values"
    assert sorted(prom.api("label/gpu/values", **{
        "match[]": f'governor_gpu_info{{instance=~"{regex_escape(instance)}"}}'})) == [
        "0", "1"], "the gpu variable's values"
    selections = {
        "All": {"instance": ".*", "gpu": ".*"},
        "one instance, two GPUs": {"instance": regex_escape(instance), "gpu": "(0|1)"},
        "one instance, GPU 0": {"instance": regex_escape(instance), "gpu": "0"},
    }
    queries = [(title, target["refId"], target["expr"]) for title, target in targets()]
    queries += [("annotation " + a["name"], "-", a["expr"])
                for a in dashboard()["annotations"]["list"] if a.get("expr")]
    empty = []
    for selection, values in selections.items():
        for title, ref, expr in queries:
            if not prom.query(substitute(expr, values)):
                if CAP_EXPR in expr and not ROOT:
                    continue  # no cap without root: the one query allowed to be empty
                empty.append(f"{title} [{ref}] with {selection}: {substitute(expr, values)}")
    assert not empty, "queries that returned nothing:\n" + "\n".join(empty)
    assert len(queries) >= 30


@needs_prometheus
def test_the_panels_show_the_jobs_thresholds_and_states_as_they_are(
        live: tuple[DaemonProcess, PrometheusServer]) -> None:
    """Beyond "some data": the values the panels draw are the daemon's."""
    _, prom = live
    every = {"instance": ".*", "gpu": ".*"}
    by_title = {p["title"]: p for p in panels()}

    def results(title: str, ref: str) -> dict[str, float]:
        (target,) = [t for t in by_title[title]["targets"] if t["refId"] == ref]
        found = prom.query(substitute(target["expr"], every))
        return {legend(target["legendFormat"], s["metric"]): float(s["value"][1])
                for s in found}

    jobs = results("Job states", "A")
    assert {re.sub(r" \(\w+\) .*", "", k): v for k, v in jobs.items()} == {
        "trainer": 2.0, "tuner": 1.0, "idle": 0.0}, "paused 2, slowed 1, running 0"
    reasons = results("Job states", "B")
    assert {re.sub(r" \(\w+\)", "", k): v for k, v in reasons.items()} == {
        "trainer held by cpu-hot, gpu-hot": 2.0, "tuner held by gpu-hot": 1.0}
    assert results("CPU temperature", "B") == {"cpu-hot trips": 80.0}
    assert results("CPU temperature", "C") == {"cpu-hot clears": 70.0}
    assert set(results("GPU temperature", "B")) == {"gpu-hot trips", "gpu-cap trips"}
    assert results("Other temperatures (NVMe, ACPI, board)", "B") == {"nvme-hot trips": 70.0}
    actions = results("Actions per minute", "A")
    assert actions[next(k for k in actions if k.startswith("pause by cpu-hot"))] > 0, (
        "the first pause of a rule counts: its counter was there at 0 before")
    rules = results("Rule states", "A")
    assert rules[next(k for k in rules if k.startswith("cpu-hot"))] == 2.0
    (job_label,) = {s["metric"].get("exported_job") for s in
                    prom.query('governor_job_paused{exported_job="trainer"}')}
    assert job_label == "trainer", "the governed job's name is kept as exported_job"


@needs_prometheus
def test_the_alert_rules_load_and_evaluate_against_the_daemon(
        live: tuple[DaemonProcess, PrometheusServer]) -> None:
    _, prom = live

    def evaluated() -> list[dict[str, Any]]:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else []

    eventually(lambda: bool(evaluated()), timeout=15, what="every rule evaluated once")
    rules = evaluated()
    assert len(rules) == len([r for g in yaml.safe_load(ALERTS.read_text())["groups"]
                              for r in g["rules"]])
    for rule in rules:
        assert (rule["name"], rule["health"], rule.get("lastError", "")) == (
            rule["name"], "ok", "")

    def active() -> dict[tuple[str, str], dict[str, Any]]:
        found = {}
        for alert in prom.api("alerts")["alerts"]:
            labels = alert["labels"]
            key = labels.get("exported_job") or labels.get("rule") or labels.get("gpu", "")
            found[(labels["alertname"], key)] = alert
        return found

    eventually(lambda: ("GovernorJobPausedTooLong", "trainer") in active(), timeout=15,
               what="the paused job's alert is pending")
    alerts = active()
    paused = alerts[("GovernorJobPausedTooLong", "trainer")]
    assert paused["state"] == "pending"
    assert "held by: cpu-hot, gpu-hot" in paused["annotations"]["description"]
    assert ("GovernorJobPausedTooLong", "tuner") not in alerts, "slowed is not paused"
    assert ("GovernorRuleTrippedTooLong", "cpu-hot") in alerts
    assert ("GovernorGpuThermalThrottling", "0") in alerts
    capped = {gpu for name, gpu in alerts if name == "GovernorGpuPowerCapped"}
    assert capped == ({"1"} if ROOT else {"0", "1"}), "governor's own cap raises nothing"
    assert not [k for k in alerts if k[0] in ("GovernorDown", "GovernorSamplerDown",
                                              "GovernorLoopStalled")]
