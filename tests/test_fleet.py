"""exporters/grafana/fleet.json and the Slurm scrape config: the fleet dashboard loads
through file provisioning as it is, every query parses, and every query returns data from
a real Prometheus that scrapes two real daemons on the nodes of a real Slurm cluster.

The live test: a Slurm cluster on localhost (tests/support/slurm_cluster.py) with nodes
node1 and node2, a governor for each node (each discovers its own node's jobs and has a
fake NVML with two GPUs), a Slurm job on each node, and one GPU of node1 made hot so that
its job is suspended (squeue S). Prometheus scrapes both daemons as two instances labelled
with their node, as slurm_targets.py labels them, and a third target, node3, where no
daemon listens: a node whose daemon is down, for the panels that show those.

slurm_targets.py runs against the same cluster: the file_sd file it writes, the scrape
config that reads it (promtool check config reads the file too), and what it does when
sinfo fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.c_nvml import CNvmlState
from tests.support.daemon import REPO, DaemonProcess, free_port
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
from tests.support.processes import eventually
from tests.support.prometheus import PrometheusServer, prometheus_binary
from tests.support.slurm_cluster import SlurmCluster, slurm_missing

FLEET = Dashboard(GRAFANA / "fleet.json")
PROMETHEUS_DIR = REPO / "exporters" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
SLURM_CONFIG = PROMETHEUS_DIR / "prometheus-slurm.yml"
SLURM_TARGETS = PROMETHEUS_DIR / "slurm_targets.py"
SPIN = "python3 -c 'while True: pass'"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (Debian: prometheus)")
needs_slurm = pytest.mark.skipif(slurm_missing() is not None, reason=str(slurm_missing()))
needs_prometheus = pytest.mark.skipif(
    prometheus_binary() is None, reason="prometheus is not installed (Debian: prometheus)")


def by_title() -> dict[str, dict[str, Any]]:
    return {panel["title"]: panel for panel in FLEET.panels()}


def exprs_of(title: str) -> str:
    return " ".join(t["expr"] for t in by_title()[title]["targets"])


# ------------------------------------------------------------------ the JSON, as Grafana needs it


def test_no_import_placeholders_so_provisioning_loads_it_as_is() -> None:
    text = FLEET.path.read_text()
    assert "__inputs" not in text and "${DS_" not in text and "__requires" not in text
    board = FLEET.board()
    assert board["uid"] == "governor-fleet" and board["title"]
    assert "id" not in board or board["id"] is None, "an id would clash in another Grafana"


def test_it_sits_beside_governor_json_so_the_same_provider_loads_both() -> None:
    """Grafana's file provider loads every *.json in its folder: the README copies the
    folder's dashboards there, so the two must differ in uid and title."""
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "governor.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and not provider["options"].get(
        "foldersFromFilesStructure")
    boards = [json.loads(path.read_text()) for path in sorted(GRAFANA.glob("*.json"))]
    assert {b["uid"] for b in boards} == {"governor", "governor-fleet"}
    assert len({b["title"] for b in boards}) == len(boards)
    readme = (REPO / "README.md").read_text()
    assert "exporters/grafana/fleet.json" in readme


def test_the_variables() -> None:
    found = FLEET.variables()
    datasource = found["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    instance = found["instance"]
    assert instance["type"] == "query" and instance["datasource"] == DATASOURCE
    assert instance["multi"] is True and instance["includeAll"] is True
    assert instance["allValue"] == ".*"
    # from `up`, not governor_build_info: a node whose daemon never answered is listed too
    assert variable_query(instance) == 'label_values(up{job="governor"}, instance)'


def test_every_panel_has_the_datasource_variable_a_description_a_unit_and_queries() -> None:
    board = FLEET.board()
    titles = [p["title"] for p in FLEET.panels()]
    assert len(titles) == len(set(titles)), "the tests (and an operator) tell panels by title"
    ids = [p["id"] for p in board["panels"]] + [
        p["id"] for row in board["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids))
    for row in board["panels"]:
        assert len(row.get("description", "")) > 20, row["title"]
    for panel in FLEET.panels():
        check_panel(panel)
        if panel["type"] == "table":
            for target in panel["targets"]:
                assert target.get("format") == "table" and target.get("instant"), \
                    panel["title"]
    for annotation in board["annotations"]["list"]:
        if not annotation.get("builtIn"):
            assert annotation["datasource"] == DATASOURCE and annotation["expr"]


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in FLEET.board()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} over {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_rates_use_rate_interval_and_selectors_use_the_variable() -> None:
    for title, _, expr in FLEET.queries():
        for window in re.findall(r"\b(?:rate|irate|increase)\([^\[]*\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", f"{title}: [{window}]"
        for selector in re.findall(r"\b(?:governor_\w+|up)\{([^}]*)\}", expr):
            assert 'instance=~"$instance"' in selector, f"{title}: {expr}"
        for selector in re.findall(r"\bup\{([^}]*)\}", expr):
            assert 'job="governor"' in selector, f"{title}: up of other scrape jobs"


def test_every_metric_the_dashboard_reads_exists() -> None:
    golden = (REPO / "tests" / "golden" / "metrics.prom").read_text()
    families = set(re.findall(r"^# TYPE (\S+) ", golden, re.MULTILINE))
    source = (REPO / "governor" / "service" / "metrics.py").read_text()
    families |= {"governor_" + name for name in re.findall(r'PREFIX \+ "(\w+)"', source)}
    exprs = [expr for _, _, expr in FLEET.queries()] + [
        variable_query(v) for v in FLEET.variables().values() if v["type"] == "query"]
    for expr in exprs:
        for name in re.findall(r"\b(governor_\w+)", expr):
            assert name in families, f"{name} in {expr}"


@needs_promtool
def test_every_query_parses(tmp_path: Path) -> None:
    """promtool parses each query, its variables substituted as Grafana would."""
    exprs = [substitute(expr, {"instance": ".*"}) for _, _, expr in FLEET.queries()]
    assert not promtool_parse_errors(exprs, tmp_path)
    assert promtool_parse_errors(["sum by (instance (up)"], tmp_path), "a bad one fails"


def test_the_panels_an_operator_asked_for() -> None:
    panels = by_title()
    hottest = exprs_of("Hottest GPUs now")
    assert re.search(r"topk\(\d+, governor_gpu_temperature_celsius\{", hottest)
    table = panels["Slurm jobs held or slowed"]
    assert table["type"] == "table"
    join = exprs_of("Slurm jobs held or slowed")
    assert re.fullmatch(
        r'governor_job_state_info\{instance=~"\$instance", state!="running"\}\s*'
        r'\* on \(instance, id\) group_left \(scheduler_id, user\)\s*'
        r'governor_job_info\{instance=~"\$instance", source="slurm"\}', join), join
    organize = table["transformations"][0]["options"]
    shown = [c for c in sorted(organize["indexByName"], key=organize["indexByName"].get)
             if not organize["excludeByName"].get(c)]
    assert shown[:2] == ["scheduler_id", "exported_job"] and {"node", "instance", "state",
                                                              "reason", "user"} <= set(shown)
    actions = exprs_of("Actions per node")
    assert actions.startswith("sum by (instance, node) (rate(governor_actions_total{")
    assert exprs_of("Nodes whose daemon is down") == (
        'up{job="governor", instance=~"$instance"} == 0')
    assert "governor_rounds_total" in exprs_of("Daemon health per node")


# ------------------------------------------------------------------ slurm_targets.py, real sinfo


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    if slurm_missing() is not None:
        pytest.skip(str(slurm_missing()))
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), ("node1", "node2")) as running:
        yield running


def slurm_targets(cluster: SlurmCluster, *args: str, conf: Path | None = None
                  ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLURM_CONF": str(conf or cluster.conf)}
    return subprocess.run([sys.executable, str(SLURM_TARGETS), *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@needs_slurm
def test_slurm_targets_lists_every_node_once_with_its_labels(
        cluster: SlurmCluster, tmp_path: Path) -> None:
    output = tmp_path / "governor-slurm.json"
    done = slurm_targets(cluster, "--output", str(output), "--cluster", "governortest")
    assert done.returncode == 0, done.stderr
    assert "2 nodes written" in done.stdout
    # each node is in two partitions (debug, urgent): sinfo -N lists it twice
    assert json.loads(output.read_text()) == [
        {"targets": [f"{node}:9474"], "labels": {"node": node, "cluster": "governortest"}}
        for node in ("node1", "node2")]
    assert output.stat().st_mode & 0o777 == 0o644, "Prometheus's user reads it"
    done = slurm_targets(cluster, "-o", str(output), "--port", "9100", "--partition", "debug")
    assert done.returncode == 0, done.stderr
    assert [g["targets"] for g in json.loads(output.read_text())] == [
        ["node1:9100"], ["node2:9100"]]


@needs_slurm
@needs_promtool
def test_the_slurm_scrape_config_reads_the_written_targets(
        cluster: SlurmCluster, tmp_path: Path) -> None:
    output = tmp_path / "governor-slurm.json"
    assert slurm_targets(cluster, "-o", str(output)).returncode == 0
    config = yaml.safe_load(SLURM_CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "governor" and not job.get("honor_labels")
    (sd,) = job["file_sd_configs"]
    assert sd["files"] == ["/etc/prometheus/governor-slurm.json"]
    sd["files"] = [str(output)]
    config["rule_files"] = [str(ALERTS)]
    copy = tmp_path / "prometheus-slurm.yml"
    copy.write_text(json.dumps(config, indent=2))  # JSON is YAML

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["promtool", "check", "config", str(copy)], capture_output=True,
                              text=True, timeout=60, check=False)

    done = check()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout
    assert not re.search(r"warn|error|fail", done.stdout + done.stderr, re.IGNORECASE)
    output.write_text('[{"targets": "node1:9474"}]')
    broken = check()
    assert broken.returncode != 0 and str(output) in broken.stdout + broken.stderr, (
        "promtool reads the file_sd file, so the check above judged the written one")


@needs_slurm
def test_a_failing_sinfo_leaves_the_file_as_it_was(cluster: SlurmCluster,
                                                   tmp_path: Path) -> None:
    output = tmp_path / "governor-slurm.json"
    assert slurm_targets(cluster, "-o", str(output)).returncode == 0
    before, stat = output.read_bytes(), output.stat()
    # the controller out of reach: the cluster's config with a port nothing listens on
    unreachable = tmp_path / "unreachable" / "slurm.conf"
    unreachable.parent.mkdir()
    # (MessageTimeout=1: sinfo gives up at once instead of retrying for 10 s)
    unreachable.write_text(re.sub(r"(?m)^SlurmctldPort=\d+$", f"SlurmctldPort={free_port()}",
                                  cluster.conf.read_text()) + "MessageTimeout=1\n")
    done = slurm_targets(cluster, "-o", str(output), conf=unreachable)
    assert done.returncode == 1
    assert "Unable to contact slurm controller" in done.stderr, done.stderr
    assert "left as it was" in done.stderr
    assert output.read_bytes() == before and output.stat().st_mtime_ns == stat.st_mtime_ns
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name, "unreachable"], (
        "no temporary file left")


# ------------------------------------------------------------------ every query, live


@dataclass
class Fleet:
    prom: PrometheusServer
    daemons: dict[str, DaemonProcess]
    #: instance label of node1's and node2's daemons, and of node3 where none listens
    instances: dict[str, str]
    #: Slurm job id on each node
    jobs: dict[str, str]


def slurm_jobs(d: DaemonProcess) -> dict[str, dict[str, Any]]:
    return {j["scheduler_id"]: j for j in d.get("/v1/jobs").json()
            if j.get("source") == "slurm"}


@pytest.fixture(scope="module")
def fleet(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Fleet]:
    """A daemon on node1 and one on node2, each discovering its node's Slurm jobs; node1's
    job on a hot GPU, suspended; one Prometheus scraping them and a node3 that is down.
    One for the module, as it takes a while to build."""
    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (Debian: prometheus)")
    root = tmp_path_factory.mktemp("fleet")
    rule = {"name": "gpu-hot", "metric": "gpu_temperature_celsius", "above": 85.0,
            "for": 0, "clear_below": 75.0, "action": "pause"}
    daemons, states = {}, {}
    with contextlib.ExitStack() as stack:
        for node in ("node1", "node2"):
            (root / node).mkdir()
            states[node] = CNvmlState(root / node / "nvml.state")
            states[node].write({"gpus": [h100(0, temperature=60), h100(1, temperature=55)]})
            daemons[node] = DaemonProcess(root / node, {
                "daemon": {"interval": 0.5},
                "slurm": {"discover": True, "conf": str(cluster.conf), "nodes": [node]},
                "rules": [rule]}, c_nvml=states[node])
            daemons[node].start()
            stack.callback(daemons[node].stop)
        jobs = {node: cluster.sbatch("-w", node, "--gres=gpu:1", "-J", f"train-{node}",
                                     wrap=SPIN) for node in daemons}
        for node, job in jobs.items():
            stack.callback(cluster.run, "scancel", "--full", job, check=False)
            stack.callback(cluster.run, "scontrol", "resume", job, check=False)
            cluster.wait_state(job, "R")
            try:
                eventually(lambda n=node, j=job: j in slurm_jobs(daemons[n]), timeout=10,
                           what=f"{node}'s daemon discovers job {job}")
            except AssertionError as failed:
                raise AssertionError(f"{failed}\n{daemons[node].log()[-4000:]}\n"
                                     f"{cluster.logs()}") from None
        instances = {node: f"127.0.0.1:{d.port}" for node, d in daemons.items()}
        instances["node3"] = f"127.0.0.1:{free_port()}"
        (root / "prometheus").mkdir()
        prom = stack.enter_context(PrometheusServer(
            root / "prometheus", list(instances.values()),
            labels={target: {"node": node} for node, target in instances.items()}))
        prom.wait_for('count(governor_job_info{source="slurm"}) == 2', what="both jobs")
        prom.wait_for('count_over_time(governor_actions_total{action="pause", '
                      'rule="gpu-hot"}[1m]) >= 2', what="the pause counter scraped at 0")
        device = slurm_jobs(daemons["node1"])[jobs["node1"]]["devices"][0]
        hot = {"gpus": [h100(0, temperature=60), h100(1, temperature=55)]}
        hot["gpus"][int(device.removeprefix("gpu"))]["temperature"] = 95
        states["node1"].write(hot)
        cluster.wait_state(jobs["node1"], "S", timeout=10)
        prom.wait_for('governor_job_state_info{state="paused"}', what="the suspended job")
        prom.wait_for('increase(governor_actions_total{action="pause", rule="gpu-hot"}[1m])'
                      ' > 0', what="the pause scraped before and after it was taken")
        prom.wait_for('up{job="governor"} == 0', what="node3 scraped and found down")
        yield Fleet(prom, daemons, instances, jobs)


@needs_slurm
@needs_prometheus
def test_every_fleet_panel_query_returns_data_from_a_real_prometheus(fleet: Fleet) -> None:
    prom, instances = fleet.prom, fleet.instances
    assert sorted(prom.api("label/instance/values", **{"match[]": 'up{job="governor"}'})) == (
        sorted(instances.values())), "the instance variable lists the down node too"
    node1, node3 = regex_escape(instances["node1"]), regex_escape(instances["node3"])
    selections = {"All": {"instance": ".*"},
                  "node1 and node3": {"instance": f"({node1}|{node3})"}}
    queries = FLEET.queries()
    empty = [f"{title} [{ref}] with {selection}: {substitute(expr, values)}"
             for selection, values in selections.items() for title, ref, expr in queries
             if not prom.query(substitute(expr, values))]
    assert not empty, "queries that returned nothing:\n" + "\n".join(empty)
    assert len(queries) >= 16


@needs_slurm
@needs_prometheus
def test_the_panels_show_the_fleet_as_it_is(fleet: Fleet) -> None:
    """Beyond "some data": the Slurm job held, where and why; the node that is down."""
    prom, instances, jobs = fleet.prom, fleet.instances, fleet.jobs

    def results(title: str, ref: str = "A", instance: str = ".*") -> list[dict[str, Any]]:
        (target,) = [t for t in by_title()[title]["targets"] if t["refId"] == ref]
        return prom.query(substitute(target["expr"], {"instance": instance}))

    def value(title: str) -> float:
        (series,) = results(title)
        return float(series["value"][1])

    assert {t: value(t) for t in ("Daemons up", "Daemons down", "Jobs held or slowed",
                                  "Slurm jobs governed", "Rules tripped", "Hottest GPU")} == {
        "Daemons up": 2, "Daemons down": 1, "Jobs held or slowed": 1,
        "Slurm jobs governed": 2, "Rules tripped": 1, "Hottest GPU": 95}

    (held,) = [s["metric"] for s in results("Slurm jobs held or slowed")]
    assert (held["scheduler_id"], held["exported_job"], held["user"], held["node"],
            held["instance"], held["state"]) == (
        jobs["node1"], "train-node1", "root", "node1", instances["node1"], "paused")
    assert "gpu-hot" in held["reason"]
    assert not results("Slurm jobs held or slowed", instance=regex_escape(instances["node2"])
                       ), "node2's job runs"

    hottest = results("Hottest GPUs now")
    top = max(hottest, key=lambda s: float(s["value"][1]))
    assert (top["metric"]["node"], float(top["value"][1])) == ("node1", 95.0)
    assert len(hottest) == 4, "two GPUs on each of two nodes"
    assert legend(by_title()["Hottest GPUs now"]["targets"][0]["legendFormat"],
                  top["metric"]).startswith(f"node1 {instances['node1']} gpu")

    actions = {s["metric"]["node"]: float(s["value"][1]) for s in results("Actions per node")}
    assert set(actions) == {"node1", "node2"} and actions["node1"] > 0

    (down,) = [s["metric"] for s in results("Nodes whose daemon is down")]
    assert (down["node"], down["instance"]) == ("node3", instances["node3"])
    health = {s["metric"]["node"]: float(s["value"][1])
              for s in results("Daemon health per node")}
    assert health == {"node1": 2.0, "node2": 2.0, "node3": 0.0}, "ok, ok, down"
    (tripped,) = [s["metric"] for s in results("Tripped rules")]
    assert (tripped["rule"], tripped["node"]) == ("gpu-hot", "node1")
    sources = {(s["metric"]["node"], s["metric"]["source"]): float(s["value"][1])
               for s in results("Jobs per node by source")}
    assert sources == {("node1", "slurm"): 1.0, ("node2", "slurm"): 1.0}
