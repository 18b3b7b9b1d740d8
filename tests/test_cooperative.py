"""Cooperative jobs end to end: the Python client (governor.client.Job) in a real process,
against a real daemon whose rules trip on a fixture sensor, or held by an operator.

The job is tests/support/coop_worker.py: it steps, calls `checkpoint()` between steps,
runs critical sections, and writes a trace of every step and every event the client
reports. The tests read the trace: what the job did, and at which step. The CPU share a
slowed job keeps is measured over a few seconds with a wide margin: it is behaviour.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from governor.client.progress import STEP_BUCKETS, Progress, ProgressReport, parse_buckets
from tests.support.coop import Worker
from tests.support.daemon import REPO, DaemonProcess
from tests.support.processes import eventually, stays, stop

StartDaemon = Callable[..., DaemonProcess]
PACKAGE = "devices/platform/coretemp.0/hwmon/hwmon0/temp1_input"


def rule(action: str = "pause", **more: Any) -> dict[str, Any]:
    body = {"name": f"cpu-{action}", "metric": "cpu_temperature_celsius",
            "match": {"chip": "platform_coretemp_0", "sensor": "Package id 0"},
            "above": 80.0, "for": 0, "clear_below": 70.0, "clear_for": 0, "action": action}
    if action == "slow":
        body["speed"] = 0.5
    return {**body, **more}


def config(sys_tree: Path, proc_tree: Path, *rules: dict[str, Any],
           **sections: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {
        "daemon": {"interval": 0.1},
        "sources": {"sysfs_root": str(sys_tree), "procfs_root": str(proc_tree), "nvml": "off"},
        "rules": list(rules) or [rule()],
    }
    for name, body in sections.items():
        base.setdefault(name, {}).update(body)
    return base


def sample(exposition: str, name: str, job_id: str) -> float:
    """The value of one job's series of `name` in a /metrics text."""
    prefix = f'{name}{{id="{job_id}",'
    values = [float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines()
              if line.startswith(prefix)]
    assert len(values) == 1, (name, job_id, values)
    return values[0]


def heat(sys_tree: Path, celsius: float) -> None:
    (sys_tree / PACKAGE).write_text(f"{int(celsius * 1000)}\n")


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None, name: str = "worker") -> Worker:
        trace = tmp_path / f"{name}-{len(started)}.jsonl"
        environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        with open(tmp_path / f"{name}-{len(started)}.log", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.coop_worker", "--trace", str(trace),
                 "--name", name, *args], env=environment, stdout=log, stderr=log)
        started.append(process)
        return Worker(trace, process)

    yield start
    for process in started:
        stop(process)


def test_run_slow_and_pause_are_honoured(daemon: StartDaemon, sys_tree: Path,
                                         proc_tree: Path, worker: Callable[..., Worker]) -> None:
    d = daemon(config(sys_tree, proc_tree, rule("slow")))
    w = worker("--config", str(d.config_path), "--step", "0.02", name="steady")
    w.wait_for("start")
    job_id = w.job_id()
    assert d.job(job_id)["mode"] == "cooperative" and d.job(job_id)["pid"] == w.process.pid
    directive = d.get(f"/v1/jobs/{job_id}/directive").json()
    assert directive["state"] == "run" and directive["defer"] is True
    assert directive["max_defer"] == 30.0
    assert w.share(2.0) > 0.75, "running: the job keeps (nearly) all of its time"

    heat(sys_tree, 95)
    w.wait_for("slowed")
    share = w.share(4.0)
    assert 0.35 < share < 0.65, f"slowed to 0.5, the job kept {share:.2f} of its time"

    assert d.call("POST", f"/v1/jobs/{job_id}/pause").status_code == 200
    held = w.wait_for("held")
    assert "operator pause" in held["reasons"]
    at = w.steps()
    stays(lambda: w.steps() <= at + 1, 1.0, what="a paused job takes no more steps")
    assert d.call("POST", f"/v1/jobs/{job_id}/resume").status_code == 200
    w.wait_for("resumed")
    heat(sys_tree, 50)
    w.wait_for("full-speed")
    eventually(lambda: w.steps() > at + 20, what="the job steps on at full speed")


def test_a_pause_inside_a_critical_section_waits_for_its_end(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        worker: Callable[..., Worker]) -> None:
    d = daemon(config(sys_tree, proc_tree))
    w = worker("--config", str(d.config_path), "--step", "0.05", "--section-every", "10",
               "--section-steps", "40", name="writer")
    entered = w.wait_for("critical-enter")
    job_id = w.job_id()
    assert d.call("POST", f"/v1/jobs/{job_id}/pause").status_code == 200
    held = w.wait_for("held")
    sequence = w.between(entered, held)
    assert sequence.index("deferred") < sequence.index("critical-exit") < len(sequence) - 1, (
        sequence)
    assert sequence.count("step") > 5, "the job went on stepping inside its section"
    deferred = w.named("deferred")[0]
    assert deferred["section"] == "checkpoint-write" and deferred["state"] == "pause"

    # progress rides on the polls: the deferral, the steps, their durations
    counted = f'governor_job_deferrals_total{{id="{job_id}",job="writer"}} 1.0'
    eventually(lambda: counted in d.metrics(), what="the deferral is counted in /metrics")
    metrics = d.metrics()
    assert f'governor_job_steps_total{{id="{job_id}",job="writer"}}' in metrics
    assert f'governor_job_step_seconds_bucket{{id="{job_id}",job="writer",le="0.1"}}' in metrics
    assert f'governor_job_step_seconds_count{{id="{job_id}",job="writer"}}' in metrics
    progress = d.job(job_id)["progress"]
    assert progress["deferrals"] == 1 and progress["steps"] > 10
    assert len(progress["step_buckets"]) == len(STEP_BUCKETS)
    events = d.get("/v1/events").json()["events"]
    deferral = [e for e in events if e["what"] == "deferral"]
    assert len(deferral) == 1 and deferral[0]["job"]["id"] == job_id
    assert deferral[0]["deferrals"] == 1 and deferral[0]["who"] == "cooperative client"

    assert d.call("POST", f"/v1/jobs/{job_id}/resume").status_code == 200
    w.wait_for("resumed")
    steps = progress["steps"]
    eventually(lambda: d.job(job_id)["progress"]["steps"] > steps,
               what="the step count moves on in /v1/jobs")
    counted_steps = sample(metrics, "governor_job_steps_total", job_id)
    eventually(lambda: sample(d.metrics(), "governor_job_steps_total", job_id) > counted_steps,
               what="governor_job_steps_total moves on")
    eventually(lambda: sample(d.metrics(), "governor_job_step_seconds_count", job_id)
               > sample(metrics, "governor_job_step_seconds_count", job_id),
               what="governor_job_step_seconds counts the new steps")


def test_max_defer_runs_out_inside_the_section(daemon: StartDaemon, sys_tree: Path,
                                               proc_tree: Path,
                                               worker: Callable[..., Worker]) -> None:
    d = daemon(config(sys_tree, proc_tree, policy={"max_defer": "500ms"}))
    w = worker("--config", str(d.config_path), "--step", "0.1", "--section-every", "5",
               "--section-steps", "100", name="long-writer")
    entered = w.wait_for("critical-enter")
    assert d.get(f"/v1/jobs/{w.job_id()}/directive").json()["max_defer"] == 0.5
    assert d.call("POST", f"/v1/jobs/{w.job_id()}/pause").status_code == 200
    held = w.wait_for("held")
    sequence = w.between(entered, held)
    assert "critical-exit" not in sequence, f"held inside the section: {sequence}"
    assert sequence.index("deferred") < sequence.index("defer-expired"), sequence
    assert d.call("POST", f"/v1/jobs/{w.job_id()}/resume").status_code == 200
    w.wait_for("resumed")


def test_a_rule_with_defer_false_acts_at_once(daemon: StartDaemon, sys_tree: Path,
                                              proc_tree: Path,
                                              worker: Callable[..., Worker]) -> None:
    d = daemon(config(sys_tree, proc_tree, rule("pause", defer=False)))
    w = worker("--config", str(d.config_path), "--step", "0.05", "--section-every", "5",
               "--section-steps", "100", name="hard-limit")
    entered = w.wait_for("critical-enter")
    heat(sys_tree, 95)
    held = w.wait_for("held")
    sequence = w.between(entered, held)
    assert "critical-exit" not in sequence and "deferred" not in sequence, sequence
    assert d.get(f"/v1/jobs/{w.job_id()}/directive").json()["defer"] is False
    heat(sys_tree, 50)
    w.wait_for("resumed")


def same_daemon(d: DaemonProcess, fresh_state: Path | None = None) -> dict[str, Any]:
    """A config for a daemon on d's port, token and (unless fresh_state) state dir."""
    state = fresh_state or Path(d.workdir / "state")
    return {"api": {"listen": f"127.0.0.1:{d.port}", "token_file": str(d.token_path)},
            "daemon": {"interval": 0.1, "state_dir": str(state)}, "sources": {"nvml": "off"}}


def test_fail_open_then_the_job_comes_back_under_a_daemon(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path, tmp_path: Path,
        worker: Callable[..., Worker]) -> None:
    d = daemon(config(sys_tree, proc_tree))
    w = worker("--config", str(d.config_path), "--step", "0.02", name="survivor")
    w.wait_for("start")
    first_id = w.job_id()
    assert d.proc is not None
    d.proc.kill()
    d.proc.wait()
    w.wait_for("unreachable")
    at = w.steps()
    eventually(lambda: w.steps() > at + 25, what="the job keeps stepping without a daemon")

    # back on the same port and state dir: the daemon adopts the job from its journal
    again = daemon(same_daemon(d))
    w.wait_for("reconnected")
    assert again.job(first_id)["pid"] == w.process.pid
    assert again.call("POST", f"/v1/jobs/{first_id}/pause").status_code == 200
    w.wait_for("held")
    assert again.call("POST", f"/v1/jobs/{first_id}/resume").status_code == 200
    w.wait_for("resumed")

    # a daemon that comes back without it (a fresh state dir): the job registers again
    again.stop()
    w.wait_for("unreachable", count=2)
    fresh = daemon(same_daemon(d, fresh_state=tmp_path / "fresh-state"))
    registered = w.wait_for("registered")
    assert registered["job"] != first_id
    job = fresh.job(str(registered["job"]))
    assert job["pid"] == w.process.pid and job["mode"] == "cooperative"
    assert fresh.call("POST", f"/v1/jobs/{registered['job']}/pause").status_code == 200
    w.wait_for("held", count=2)


def test_fail_closed_holds_while_the_daemon_is_away(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        worker: Callable[..., Worker]) -> None:
    d = daemon(config(sys_tree, proc_tree))
    w = worker("--config", str(d.config_path), "--step", "0.02", "--fail-closed",
               name="careful")
    w.wait_for("start")
    eventually(lambda: w.steps() > 5)
    assert d.proc is not None
    d.proc.kill()
    d.proc.wait()
    held = w.wait_for("held")
    assert "cannot be reached" in held["reasons"][0]
    at = w.steps()
    stays(lambda: w.steps() <= at + 1, 1.0, what="fail-closed: no step without the daemon")
    daemon(same_daemon(d))
    w.wait_for("resumed")
    eventually(lambda: w.steps() > at + 10, what="steps again once the daemon answers")


def test_an_operator_who_unregisters_the_job_sets_it_free(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        worker: Callable[..., Worker]) -> None:
    d = daemon(config(sys_tree, proc_tree))
    w = worker("--config", str(d.config_path), "--step", "0.02", name="freed")
    w.wait_for("start")
    assert d.call("DELETE", f"/v1/jobs/{w.job_id()}").status_code == 204
    w.wait_for("released")
    at = w.steps()
    eventually(lambda: w.steps() > at + 10, what="the job runs on, ungoverned")
    assert d.get("/v1/jobs").json() == [], "it did not register itself again"


def test_two_ranks_hold_at_the_same_step(daemon: StartDaemon, sys_tree: Path,
                                         proc_tree: Path, tmp_path: Path,
                                         worker: Callable[..., Worker]) -> None:
    d = daemon(config(sys_tree, proc_tree))
    sock = str(tmp_path / "ranks.sock")
    common = ("--config", str(d.config_path), "--step", "0.02", "--socket", sock,
              "--ranks", "2")
    rank0 = worker(*common, "--rank", "0", name="ranks")
    rank1 = worker(*common, "--rank", "1", name="ranks")
    rank0.wait_for("start")
    eventually(lambda: rank1.steps() > 20, what="both ranks step")
    job_id = rank0.job_id()
    assert d.call("POST", f"/v1/jobs/{job_id}/pause").status_code == 200
    rank0.wait_for("held")
    time.sleep(0.5)
    at = (rank0.steps(), rank1.steps())
    assert at[0] == at[1], f"the ranks hold at steps {at}"
    stays(lambda: (rank0.steps(), rank1.steps()) == at, 1.5,
          what="neither rank steps while the job is paused")
    assert d.call("POST", f"/v1/jobs/{job_id}/resume").status_code == 200
    for rank in (rank0, rank1):
        assert rank.wait_for("checkpoint-held")["step"] == at[0]
    eventually(lambda: min(rank0.steps(), rank1.steps()) > at[0] + 10,
               what="both ranks step again")
    assert d.job(job_id)["progress"]["steps"] > 0


def test_progress_values_are_checked_and_never_go_back(daemon: StartDaemon, sys_tree: Path,
                                                       proc_tree: Path) -> None:
    d = daemon(config(sys_tree, proc_tree))
    job_id = d.register(name="shell-job", mode="cooperative")["id"]
    path = f"/v1/jobs/{job_id}/directive"
    buckets = "0,1,2,3,4,5,6,6"

    def poll(**params: Any) -> httpx.Response:
        return d.call("GET", path, params=params)

    assert poll(steps=6, step_seconds=12.5, step_buckets=buckets, deferrals=2).status_code \
        == 200
    assert poll(steps=3, step_seconds=1.0, step_buckets="0,0,0,1,1,2,3,3").status_code == 200
    progress = d.job(job_id)["progress"]
    assert (progress["steps"], progress["step_seconds"], progress["deferrals"]) == (6, 12.5, 2)
    assert progress["step_buckets"] == [0, 1, 2, 3, 4, 5, 6, 6], "a late poll changes nothing"
    assert poll(steps=7).status_code == 200 and d.job(job_id)["progress"]["steps"] == 7
    for bad, why in (({"steps": -1}, "steps"), ({"step_seconds": "nan"}, "step_seconds"),
                     ({"step_buckets": "1,2", "step_seconds": 1}, "8 comma-separated"),
                     ({"step_buckets": "2,1,1,1,1,1,1,1", "step_seconds": 1}, "never decrease"),
                     ({"step_buckets": buckets}, "needs step_seconds"),
                     ({"step_buckets": buckets, "step_seconds": 1, "steps": 5}, "but steps is 5"),
                     ({"step_buckets": "a,b"}, "step_buckets")):
        response = poll(**bad)
        assert response.status_code == 422, (bad, response.text)
        assert why in response.json()["error"], (bad, response.json())
    # anyone may read a directive; progress is the job's own to report
    assert d.get(path).status_code == 200
    forged = d.get(path, params={"steps": 9007199254740992, "deferrals": 9007199254740992})
    assert forged.status_code == 403, forged.text
    assert forged.json() == {"error": "Progress is taken only from the job's owner: poll "
                                      "over the unix socket as its user, or with the token."}
    assert d.job(job_id)["progress"]["steps"] == 7, "a forged report changes nothing"
    assert d.get("/v1/jobs/nosuchjob/directive", params={"steps": 1}).status_code == 404


def test_progress_merges_like_a_counter() -> None:
    first = Progress().merged(ProgressReport(5, 2.0, parse_buckets("1,2,3,4,5,5,5,5"), 1), 10.0)
    assert (first.steps, first.step_seconds, first.deferrals, first.reported_at) == (
        5, 2.0, 1, 10.0)
    late = first.merged(ProgressReport(4, 1.5, parse_buckets("1,2,3,4,4,4,4,4"), 0), 11.0)
    assert late == first, "a report overtaken by a newer one is ignored"
    later = first.merged(ProgressReport(deferrals=3), 12.0)
    assert later.deferrals == 3 and later.steps == 5 and later.reported_at == 12.0
    with pytest.raises(ValueError, match="whole number"):
        parse_buckets("1,2,3,x,5,6,7,8")


def test_launch_mode_cooperative_and_from_env(daemon: StartDaemon, sys_tree: Path,
                                              proc_tree: Path, tmp_path: Path) -> None:
    d = daemon(config(sys_tree, proc_tree))
    trace = tmp_path / "launched.jsonl"
    env = {**d.env, "GOVERNOR_CONFIG": str(d.config_path)}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "governor", "launch", "--name", "launched", "--mode",
         "cooperative", "--device", "gpu0", "--", sys.executable, "-m",
         "tests.support.coop_worker", "--trace", str(trace), "--from-env", "--step", "0.02"],
        env=env, cwd=REPO)
    try:
        w = Worker(trace, launcher)
        started = w.wait_for("start")
        job = d.job(str(started["job"]))
        assert (job["name"], job["mode"], job["devices"]) == ("launched", "cooperative",
                                                              ["gpu0"])
        assert d.call("POST", f"/v1/jobs/{started['job']}/pause").status_code == 200
        w.wait_for("held")
        assert d.call("POST", f"/v1/jobs/{started['job']}/resume").status_code == 200
        w.wait_for("resumed")
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(15) == 128 + signal.SIGTERM
        eventually(lambda: d.get("/v1/jobs").json() == [], what="the launcher unregistered it")
    finally:
        stop(launcher)
