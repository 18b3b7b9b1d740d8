"""The governor end to end: a real daemon, real processes, real signals and cgroups.

The daemon runs against a fixture sysfs tree; a test heats a sensor by writing its file,
and watches the job stop (state T in /proc/PID/stat), then cools it and watches the job
run again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.c_nvml import CNvmlState
from tests.support.daemon import DaemonProcess
from tests.support.fake_nvml import h100
from tests.support.processes import (
    busy_child,
    cpu_seconds,
    eventually,
    favour,
    state,
    stays,
    stop,
)
from tests.support.scenario import CPU_HOT, ROOT, config, heat, running, spawn, stopped
from tests.support.unix_http import unix_request

StartDaemon = Callable[..., DaemonProcess]
def test_a_hot_sensor_pauses_the_job_and_cooling_resumes_it(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    d = daemon(config(sys_tree, proc_tree))
    pid = spawn(children)
    job = d.register(name="trainer", pid=pid)
    assert job["mode"] == "signal" and job["state"] == "running"
    heat(sys_tree, 95)
    eventually(stopped(pid), what="the job stops when the sensor is hot")
    assert ('governor_rule_state{rule="cpu-hot",series="cpu_temperature_celsius{chip=\\"'
            'platform_coretemp_0\\",sensor=\\"Package id 0\\"}"} 2.0') in d.metrics()
    paused = d.job(job["id"])
    assert paused["state"] == "paused" and paused["speed"] == 0
    assert paused["reasons"] == [
        'cpu-hot: cpu_temperature_celsius{chip="platform_coretemp_0",sensor="Package id 0"} '
        "= 95 (above 80)"]
    heat(sys_tree, 60)
    eventually(running(pid), what="the job runs again when the sensor has cooled")
    assert d.job(job["id"])["state"] == "running"
    metrics = d.metrics()
    assert 'governor_actions_total{action="pause",rule="cpu-hot"} 1.0' in metrics
    assert 'governor_actions_total{action="resume",rule="cpu-hot"} 1.0' in metrics
    log = d.log()
    assert '"action": "pause", "job": "trainer"' in log and '"by": "rule cpu-hot"' in log


def test_inside_the_hysteresis_band_every_view_gives_a_true_reason(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    """Cooled to 75, between the clear line (70) and the trip line (80), the job stays
    paused; the reason must not say 75 is above 80, in /v1/jobs, `status`, `top` or the
    metrics."""
    d = daemon(config(sys_tree, proc_tree, {**CPU_HOT, "clear_for": "2s"}))
    pid = spawn(children)
    job = d.register(name="trainer", pid=pid)
    heat(sys_tree, 95.5)
    eventually(stopped(pid), what="the job stops when the sensor is hot")
    heat(sys_tree, 75)
    series = 'cpu_temperature_celsius{chip="platform_coretemp_0",sensor="Package id 0"}'
    expected = (f"cpu-hot: {series} tripped above 80 at 95.5; held until below 70 for 2s; "
                "now 75")
    eventually(lambda: d.job(job["id"])["reasons"] == [expected],
               what=f"the reason reads {expected!r}")
    assert state(pid) == "T", "inside the band the job stays paused"
    assert expected in d.cli("status").stdout
    top = d.cli("top", "--once", env={"COLUMNS": "400"}).stdout
    assert "held until below 70 for 2s; now 75" in top, top
    assert "(above 80)" not in top
    labels = f'id="{job["id"]}",job="trainer",reason="cpu-hot",state="paused"'
    assert f"governor_job_state_info{{{labels}}} 1.0" in d.metrics()
    heat(sys_tree, 60)
    eventually(running(pid), what="the job runs again 2 s after the sensor cooled")


def test_grandchildren_forked_after_registration_are_paused_too(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    d = daemon(config(sys_tree, proc_tree))
    script = ("sleep 0.3; (while :; do :; done) & "
              f"{sys.executable} -c 'import os,time\nif os.fork()==0:\n while True: pass\n"
              "time.sleep(600)' & wait")
    pid = spawn(children, ["sh", "-c", script])
    d.register(name="forker", pid=pid)
    import psutil

    eventually(lambda: len(psutil.Process(pid).children(recursive=True)) >= 3,
               what="the job forked its grandchildren")
    tree = [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
    heat(sys_tree, 95)
    eventually(lambda: all(state(p) == "T" for p in tree), what="every process is stopped")
    heat(sys_tree, 60)
    eventually(lambda: all(state(p) in "RS" for p in tree), what="every process runs again")


@pytest.mark.skipif(not ROOT, reason="cgroups need root")
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_cgroup_mode(version: str, daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
                     children: list[subprocess.Popen[bytes]]) -> None:
    d = daemon(config(sys_tree, proc_tree, jobs={"cgroup_version": version}))
    pid = spawn(children)
    job = d.register(name="frozen", pid=pid, mode="cgroup")
    cgroup = Path(job["cgroup"])
    assert cgroup.is_dir() and str(pid) in (cgroup / "cgroup.procs").read_text().split()

    def frozen() -> bool:
        if version == "v2":
            return "frozen 1" in (cgroup / "cgroup.events").read_text()
        return (cgroup / "freezer.state").read_text().strip() == "FROZEN"

    heat(sys_tree, 95)
    eventually(frozen, what=f"the job's {version} cgroup is frozen")
    before = cpu_seconds(pid)
    time.sleep(0.5)
    assert cpu_seconds(pid) - before < 0.05, "a frozen job uses no CPU"
    heat(sys_tree, 60)
    eventually(lambda: not frozen(), what="the cgroup is thawed")
    before = cpu_seconds(pid)
    eventually(lambda: cpu_seconds(pid) - before > 0.1, what="the job runs again")
    assert d.call("DELETE", f"/v1/jobs/{job['id']}").status_code == 204
    eventually(lambda: not cgroup.exists(), what="the governor's cgroup is removed")
    own = Path(f"/proc/{pid}/cgroup").read_text()
    assert f"governor-{job['id']}" not in own, "the process is back in its own cgroup"


def test_two_gpus_heating_gpu1_pauses_only_its_job(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path, c_nvml: CNvmlState,
        children: list[subprocess.Popen[bytes]]) -> None:
    on_gpu0, on_gpu1, auto = spawn(children), spawn(children), spawn(children)
    gpus = {"gpus": [h100(0, temperature=60), h100(1, temperature=60, pids=[auto])]}
    c_nvml.write(gpus)
    rule = {"name": "gpu-hot", "metric": "gpu_temperature_celsius", "above": 85.0, "for": 0,
            "clear_below": 80.0, "action": "pause"}
    d = daemon(config(sys_tree, proc_tree, rule), c_nvml=c_nvml)
    d.register(name="zero", pid=on_gpu0, devices=["gpu0"])
    d.register(name="one", pid=on_gpu1, devices=["gpu1"])
    bound = d.register(name="auto", pid=auto)
    eventually(lambda: d.job(bound["id"])["devices"] == ["gpu1"],
               what="the unbound job is bound to gpu1 through NVML's process list")
    assert d.job(bound["id"])["devices_from"] == "nvml"
    gpus["gpus"][1]["temperature"] = 90
    c_nvml.write(gpus)
    eventually(stopped(on_gpu1), what="the job on gpu1 stops")
    eventually(stopped(auto), what="the job NVML binds to gpu1 stops")
    stays(running(on_gpu0), 0.5, what="the job on gpu0 keeps running")
    gpus["gpus"][1]["temperature"] = 70
    c_nvml.write(gpus)
    eventually(running(on_gpu1))
    eventually(running(auto))


def test_hysteresis_no_flapping_inside_the_band(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    # clear_for = 0: nothing but the band [70, 80] can keep this from flapping
    d = daemon(config(sys_tree, proc_tree, {**CPU_HOT, "clear_for": 0}))
    pid = spawn(children)
    d.register(name="steady", pid=pid)
    heat(sys_tree, 81)
    eventually(stopped(pid))
    for i in range(20):  # around the trip line, inside the band [70, 80]
        heat(sys_tree, 79 if i % 2 else 81)
        d.wait_rounds(1)
    assert state(pid) == "T"
    metrics = d.metrics()
    assert 'governor_actions_total{action="pause",rule="cpu-hot"} 1.0' in metrics
    assert 'governor_actions_total{action="resume",rule="cpu-hot"} 0.0' in metrics


def test_slow_in_signal_mode_through_the_daemon(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    d = daemon(config(sys_tree, proc_tree, {**CPU_HOT, "action": "slow", "speed": 0.3}))
    pid = spawn(children)
    favour([pid])  # the shares measured here are the governor's, not the machine's load
    job = d.register(name="slowed", pid=pid)
    heat(sys_tree, 95)
    eventually(lambda: d.job(job["id"])["state"] == "slowed")
    time.sleep(1)  # let the duty cycle settle
    before, began = cpu_seconds(pid), time.monotonic()
    time.sleep(10)
    share = (cpu_seconds(pid) - before) / (time.monotonic() - began)
    assert 0.20 <= share <= 0.35, f"slowed to 0.3, the job used {share:.0%} of a core"
    metrics = d.metrics()
    assert f'governor_job_speed_ratio{{id="{job["id"]}",job="slowed"}} 0.3' in metrics


def test_operator_pause_holds_until_resume_and_rules_still_apply(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    d = daemon(config(sys_tree, proc_tree))
    pid = spawn(children)
    job = d.register(name="held", pid=pid)
    held = d.call("POST", f"/v1/jobs/{job['id']}/pause")
    assert held.status_code == 200 and held.json()["held_by_operator"] is True
    assert held.json()["state"] == "paused"
    assert state(pid) == "T", "paused before the answer came back"
    d.wait_rounds(3)
    assert state(pid) == "T"
    heat(sys_tree, 95)
    eventually(lambda: d.get("/v1/rules").json()[0]["state"] == "tripped")
    resumed = d.call("POST", f"/v1/jobs/{job['id']}/resume").json()
    assert resumed["held_by_operator"] is False
    assert resumed["state"] == "paused", "the hot sensor still holds it"
    heat(sys_tree, 60)
    eventually(running(pid))


def test_reload_keeps_rule_state_and_refuses_a_bad_file(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    d = daemon(config(sys_tree, proc_tree, {**CPU_HOT, "clear_for": "1h"}))
    pid = spawn(children)
    d.register(name="job", pid=pid)
    heat(sys_tree, 95)
    eventually(stopped(pid))
    text = d.config_path.read_text()
    d.config_path.write_text(text.replace("above = 80.0", "above = 90.0"))
    reloaded = d.call("POST", "/v1/reload")
    assert reloaded.status_code == 200
    assert reloaded.json()["rules"][0]["state"] == "tripped", "the rule's state was kept"
    d.config_path.write_text(text.replace("above = 80.0", "above = 'hot'"))
    refused = d.call("POST", "/v1/reload")
    assert refused.status_code == 422
    assert "rules[0].above" in refused.json()["error"]
    heat(sys_tree, 60)  # still the clear_for = 1h rule: the job stays held
    d.wait_rounds(3)
    assert state(pid) == "T"
    # SIGHUP reloads too: a file without the rule frees the job
    d.config_path.write_text(text.split("[[rules]]")[0])
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    eventually(running(pid), what="the job is released once the rule is gone")


def test_errors_are_4xx_with_one_sentence(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    d = daemon(config(sys_tree, proc_tree))
    pid = spawn(children)
    assert d.proc is not None

    def post(body: Any, **kwargs: Any) -> httpx.Response:
        return d.call("POST", "/v1/jobs", json=body, **kwargs)

    cases = [
        (post({"name": "init", "pid": 1}), 403, "Pid 1 (init) cannot be governed."),
        (post({"name": "me", "pid": d.proc.pid}), 403, f"Pid {d.proc.pid} is the governor "
                                                       "itself."),
        (post({"name": "parent", "pid": os.getpid()}), 403, "ancestor of the governor"),
        (post({"name": "kthread", "pid": 2}), 403, "kernel thread"),
        (post({"name": "ghost", "pid": 4194000}), 422, "No process has pid 4194000."),
        (post({"name": "reused", "pid": pid, "pid_started_at": 1.0}), 409,
         f"Pid {pid} is now another process"),
        (post({"name": "x", "pid": "12"}), 422, "pid"),
        (post({"name": "x", "pid": pid, "colour": "red"}), 422, "colour"),
        (post({"pid": pid}), 422, "name"),
        (post({"name": "x", "mode": "signal"}), 422, "needs a pid or a cgroup"),
        (post({"name": "x", "pid": pid}, auth=False), 401, "Authorization: Bearer"),
        (post({"name": "x", "pid": pid}, auth=False, headers={"Authorization": "Bearer nope"}),
         401, "The token is wrong."),
        (d.call("POST", "/v1/jobs", content=b"{not json",
                headers={"Content-Type": "application/json"}), 400,
         "The request body is not valid JSON."),
        (d.get("/v1/jobs/nosuchjob"), 404, "There is no job 'nosuchjob'."),
        (d.call("DELETE", "/v1/jobs/nosuchjob"), 404, "There is no job"),
        (d.call("POST", "/v1/jobs/nosuchjob/pause"), 404, "There is no job"),
        (d.get("/v1/jobs/nosuchjob/directive"), 404, "There is no job"),
        (d.call("POST", "/v1/reload", auth=False), 401, "Authorization"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (status, response.text)
        body = response.json()
        assert set(body) == {"error"} and words in body["error"], body
    first = d.register(name="once", pid=pid)
    again = post({"name": "twice", "pid": pid})
    assert again.status_code == 409 and first["id"] in again.json()["error"]
    directive = d.get(f"/v1/jobs/{first['id']}/directive", params={"wait": -1})
    assert directive.status_code == 422


@pytest.mark.skipif(not ROOT, reason="forcing a pid to be reused needs root")
def test_a_reused_pid_is_never_signalled(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    """The pid is reused before the daemon's next round can notice its job exited; an
    operator pause then acts at once, and must not reach the newcomer."""
    cfg = config(sys_tree, proc_tree)
    cfg["daemon"]["interval"] = 30.0
    d = daemon(cfg)
    victim = busy_child()
    job = d.register(name="short-lived", pid=victim.pid)
    pid = victim.pid
    victim.kill()
    victim.wait()
    newcomer = None
    for _ in range(50):  # other processes fork too: retry until the pid comes round
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        candidate = busy_child()
        if candidate.pid == pid:
            newcomer = candidate
            break
        stop(candidate)
    if newcomer is None:
        pytest.skip(f"could not get pid {pid} reused")
    children.append(newcomer)
    assert d.job(job["id"])["state"] == "running", "no round has seen the exit yet"
    d.call("POST", f"/v1/jobs/{job['id']}/pause")
    stays(lambda: state(pid) != "T", 0.5, what="the newcomer that took the pid runs on")


def test_launch_exits_with_the_commands_status_and_unregisters(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path) -> None:
    d = daemon(config(sys_tree, proc_tree))
    result = d.cli("launch", "--name", "three", "--", "sh", "-c", "exit 3")
    assert result.returncode == 3, result.stderr
    assert d.get("/v1/jobs").json() == []
    env = d.cli("launch", "--", "sh", "-c", 'echo "$GOVERNOR_URL $GOVERNOR_JOB_ID"')
    url, job_id = env.stdout.split()
    assert url == d.url and len(job_id) == 8
    assert d.get("/v1/jobs").json() == []


def test_launched_jobs_are_governed(daemon: StartDaemon, sys_tree: Path,
                                    proc_tree: Path, tmp_path: Path) -> None:
    d = daemon(config(sys_tree, proc_tree))
    marker = tmp_path / "pid"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "governor", "launch", "--name", "launched", "--config",
         str(d.config_path), "--", "sh", "-c", f"echo $$ > {marker}; while :; do :; done"],
        env=d.env, cwd=d.workdir)
    try:
        eventually(lambda: marker.exists() and marker.read_text().strip() != "")
        pid = int(marker.read_text())
        (job,) = d.get("/v1/jobs").json()
        assert job["pid"] == pid and job["name"] == "launched"
        heat(sys_tree, 95)
        eventually(stopped(pid))
        launcher.send_signal(signal.SIGTERM)  # forwarded to the job, which is resumed first
        assert launcher.wait(15) == 128 + signal.SIGTERM
        assert d.get("/v1/jobs").json() == []
    finally:
        launcher.kill()


def test_cooperative_directive_long_poll(daemon: StartDaemon, sys_tree: Path,
                                         proc_tree: Path) -> None:
    d = daemon(config(sys_tree, proc_tree))
    job = d.register(name="polite", mode="cooperative")
    assert job["mode"] == "cooperative" and job["pid"] is None
    first = d.get(f"/v1/jobs/{job['id']}/directive").json()
    assert first["state"] == "run" and first["speed"] == 1.0
    began = time.monotonic()
    import threading

    threading.Timer(0.5, heat, (sys_tree, 95)).start()
    changed = d.get(f"/v1/jobs/{job['id']}/directive",
                    params={"wait": 20, "since": first["version"]}).json()
    assert changed["state"] == "pause" and changed["version"] > first["version"]
    assert time.monotonic() - began < 15, "the long poll returned on the change"
    quiet = d.get(f"/v1/jobs/{job['id']}/directive",
                  params={"wait": 0.3, "since": changed["version"]}).json()
    assert quiet["version"] == changed["version"]


def test_power_cap_rule_with_the_c_fake_nvml(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path, c_nvml: CNvmlState,
        children: list[subprocess.Popen[bytes]]) -> None:
    if not ROOT:
        pytest.skip("setting a power limit needs root")
    gpus = {"gpus": [h100(0, temperature=60)]}
    c_nvml.write(gpus)
    rule = {"name": "cap", "metric": "gpu_temperature_celsius", "above": 80.0, "for": 0,
            "clear_below": 75.0, "action": "power_cap", "power_cap_watts": 250}
    d = daemon(config(sys_tree, proc_tree, rule), c_nvml=c_nvml)
    d.register(name="on-gpu0", pid=spawn(children), devices=["gpu0"])
    gpus["gpus"][0]["temperature"] = 85
    c_nvml.write(gpus)
    eventually(lambda: 'governor_gpu_power_limit_watts{gpu="0"} 250.0' in d.metrics())
    assert 'governor_gpu_power_cap_watts{gpu="0"} 250.0' in d.metrics()
    assert d.get("/v1/rules").json()[0]["enforceable"] is True
    assert c_nvml.limits() == {0: 250000}, "the driver was asked for 250 W"
    gpus["gpus"][0]["temperature"] = 70
    c_nvml.write(gpus)
    eventually(lambda: 'governor_gpu_power_limit_watts{gpu="0"} 700.0' in d.metrics())
    assert 'governor_actions_total{action="restore",rule="cap"} 1.0' in d.metrics()
    assert c_nvml.limits() == {0: 700000}, "and then for the limit it had before"
    assert "nvmlDeviceSetPowerManagementLimit" in c_nvml.calls()


def test_power_cap_without_nvml_is_reported_not_enforceable(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path) -> None:
    rule = {"name": "cap", "metric": "gpu_temperature_celsius", "above": 80.0,
            "action": "power_cap", "power_cap_watts": 250}
    d = daemon(config(sys_tree, proc_tree, rule, sources={"nvml": "off"}))
    (entry,) = d.get("/v1/rules").json()
    assert entry["enforceable"] is False and "NVML is off" in entry["not_enforceable_because"]
    d.stop()
    assert "rule cap (power_cap) is not enforceable" in d.log()


def test_cli_register_status_pause_resume_unregister(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    d = daemon(config(sys_tree, proc_tree))
    pid = spawn(children)
    registered = d.cli("register", "--name", "cli-job", "--pid", str(pid), "--device", "gpu0")
    assert registered.returncode == 0, registered.stderr
    job_id = registered.stdout.strip()
    jobs = d.cli("jobs")
    assert job_id in jobs.stdout and "cli-job" in jobs.stdout and "gpu0" in jobs.stdout
    paused = d.cli("pause", job_id)
    assert paused.stdout.strip() == f"{job_id} cli-job: paused (held by the operator)"
    assert state(pid) == "T"
    status = d.cli("status")
    assert "Rules" in status.stdout and "cpu-hot" in status.stdout
    assert "paused (operator)" in status.stdout and "operator pause" in status.stdout
    assert d.cli("resume", job_id).stdout.strip() == f"{job_id} cli-job: running"
    assert d.cli("unregister", job_id).returncode == 0
    assert d.get("/v1/jobs").json() == []
    missing = d.cli("pause", job_id)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"governor: There is no job '{job_id}'."


def test_cli_without_a_daemon(tmp_path: Path) -> None:
    from tests.support.daemon import free_port, to_toml

    config_path = tmp_path / "governor.toml"
    config_path.write_text(to_toml({"api": {"listen": f"127.0.0.1:{free_port()}",
                                            "token_file": ""}}))
    result = subprocess.run([sys.executable, "-m", "governor", "jobs", "--config",
                             str(config_path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("governor: cannot reach the governor at http://127.0.0.1:")


@pytest.mark.skipif(not ROOT, reason="acting as another user needs root")
def test_unix_socket_callers_are_identified_by_uid(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path, tmp_path: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    import json
    import shutil
    import tempfile

    nobody = 65534
    base = Path(tempfile.mkdtemp(prefix="governor-sock-"))  # pytest's tmp is root-only
    base.chmod(0o755)
    sock = base / "run" / "governor.sock"
    d = daemon(config(sys_tree, proc_tree, api={"socket": str(sock)}))
    d.cleanups.append(lambda: shutil.rmtree(base, ignore_errors=True))
    assert (sock.parent.stat().st_mode & 0o777) == 0o750, "the socket sits in a 0750 directory"
    # this test lets `nobody` through the directory, as a group membership would
    os.chmod(sock.parent, 0o755)
    os.chmod(sock, 0o666)
    roots = spawn(children)
    theirs = subprocess.Popen(["sleep", "60"], user=nobody)
    children.append(theirs)

    status, error = unix_request(sock, "POST", "/v1/jobs",
                                 json.dumps({"name": "not-mine", "pid": roots}), as_uid=nobody)
    assert (status, error) == (403, f"Pid {roots} is not yours; only root may govern another "
                                    "user's process.")
    status, body = unix_request(sock, "POST", "/v1/jobs",
                                json.dumps({"name": "mine", "pid": theirs.pid}), as_uid=nobody)
    assert status == 201, body
    assert json.loads(body)["owner_uid"] == nobody
    root_job = d.register(name="roots", pid=roots)
    status, error = unix_request(sock, "POST", f"/v1/jobs/{root_job['id']}/pause",
                                 as_uid=nobody)
    assert status == 403 and "not yours" in error
    assert state(roots) != "T"
    status, error = unix_request(sock, "POST", "/v1/jobs", json.dumps(
        {"name": "cg", "pid": theirs.pid, "mode": "cgroup"}), as_uid=nobody)
    assert (status, error) == (403, "Only root or a token holder may use cgroups.")
    status, error = unix_request(sock, "POST", "/v1/reload", as_uid=nobody)
    assert (status, error) == (403, "Only root or a token holder may reload the config.")
    # root over the socket needs no token and may govern anything
    status, body = unix_request(sock, "POST", f"/v1/jobs/{root_job['id']}/pause")
    assert status == 200 and json.loads(body)["state"] == "paused"
    assert state(roots) == "T"


def test_the_token_file_is_created_private(daemon: StartDaemon, sys_tree: Path,
                                           proc_tree: Path) -> None:
    d = daemon(config(sys_tree, proc_tree))
    assert d.token_path is not None
    assert (d.token_path.stat().st_mode & 0o777) == 0o600
    assert len(d.token) >= 32


def test_forwarded_headers_cannot_pose_as_the_unix_socket(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    d = daemon(config(sys_tree, proc_tree))
    pid = spawn(children)
    for header in ("[uid:0]", "uid:0", "uid:0:1", "127.0.0.1"):
        response = d.call("POST", "/v1/jobs", json={"name": "sneaky", "pid": pid}, auth=False,
                          headers={"X-Forwarded-For": header, "X-Real-IP": header,
                                   "Forwarded": f"for={header}"})
        assert response.status_code == 401, (header, response.text)
    assert d.get("/v1/jobs").json() == []


def test_an_existing_socket_directory_keeps_its_mode(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    daemon(config(sys_tree, proc_tree, api={"socket": str(shared / "governor.sock")}))
    assert (shared.stat().st_mode & 0o7777) == 0o1777


@pytest.mark.skipif(not ROOT, reason="cgroups need root")
def test_a_cgroup_holding_a_protected_process_is_refused(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path) -> None:
    import psutil

    d = daemon(config(sys_tree, proc_tree))
    assert d.proc is not None
    (guardian,) = psutil.Process(d.proc.pid).children()
    trap = Path(f"/sys/fs/cgroup/unified/trap-{os.getpid()}")
    trap.mkdir()
    home = Path(f"/proc/{guardian.pid}/cgroup").read_text().split("0::")[1].split()[0]
    try:
        (trap / "cgroup.procs").write_text(str(guardian.pid))
        response = d.call("POST", "/v1/jobs", json={"name": "trap", "cgroup": str(trap)})
        assert response.status_code == 403, response.text
        assert f"holds pid {guardian.pid}" in response.json()["error"]
        assert "frozen 0" in (trap / "cgroup.events").read_text()
    finally:
        Path(f"/sys/fs/cgroup/unified{home}/cgroup.procs").write_text(str(guardian.pid))
        trap.rmdir()


@pytest.mark.skipif(not ROOT, reason="cgroups need root")
def test_one_cgroup_under_two_spellings_is_one_job(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    d = daemon(config(sys_tree, proc_tree, jobs={"cgroup_version": "v2"}))
    name = f"spelled-{os.getpid()}"
    group = Path(f"/sys/fs/cgroup/unified/{name}")
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(spawn(children)))
        first = d.register(name="a", cgroup=f"/{name}")
        for spelling in (str(group), f"{group}/", f"/{name}/"):
            again = d.call("POST", "/v1/jobs", json={"name": "b", "cgroup": spelling})
            assert again.status_code == 409 and first["id"] in again.json()["error"], spelling
        assert d.call("DELETE", f"/v1/jobs/{first['id']}").status_code == 204
    finally:
        for child in children:
            stop(child)
        children.clear()
        eventually(lambda: not (group / "cgroup.procs").read_text().strip())
        group.rmdir()


def test_an_unexpected_error_is_a_json_500() -> None:
    from fastapi.testclient import TestClient

    from governor.api.app import create_app
    from governor.api.auth import Authenticator

    class Broken:
        controller: Any = None

        def health(self) -> tuple[bool, str]:
            raise RuntimeError("boom")

        def latest(self) -> None:
            return None

        def render_metrics(self) -> bytes:
            return b""

        def cached_metrics(self) -> bytes | None:
            return None

        def reload(self) -> list[dict[str, Any]]:
            return []

    class Idle:
        view = None

        def add_listener(self, _: Any) -> None:
            pass

    broken = Broken()
    broken.controller = Idle()
    client = TestClient(create_app(broken, Authenticator(None, False)),
                        raise_server_exceptions=False)
    response = client.get("/healthz", headers={"Host": "localhost"})
    assert response.status_code == 500
    assert response.json() == {"error": "The governor failed to answer: RuntimeError."}
