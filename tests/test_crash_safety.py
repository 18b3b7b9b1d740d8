"""No job stays held after the governor is gone: kill -9 in every hold mode, at random
moments of a duty cycle, SIGTERM, release-all; and a restart keeps jobs and operator holds.

Each kill is a real SIGKILL of the daemon process; the guardian it started must release
every hold within 2 seconds (the promise README's Safety section makes).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from governor.host.cgroupfs import find_hierarchies, process_cgroups
from governor.safety.journal import Journal
from tests.support.c_nvml import CNvmlState
from tests.support.daemon import DaemonProcess
from tests.support.fake_nvml import h100
from tests.support.processes import busy_child, cpu_seconds, eventually, state, stays, stop

StartDaemon = Callable[..., DaemonProcess]
PACKAGE = "devices/platform/coretemp.0/hwmon/hwmon0/temp1_input"
RELEASE_DEADLINE = 2.0
ROOT = os.geteuid() == 0
#: every kill's time to release, for the closing note (printed with -s)
RELEASE_TIMES: list[float] = []

SLOW_RULE = {"name": "cpu-hot", "metric": "cpu_temperature_celsius",
             "match": {"chip": "platform_coretemp_0", "sensor": "Package id 0"},
             "above": 80.0, "for": 0, "clear_below": 70.0, "action": "slow", "speed": 0.3}


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    process = busy_child()
    yield process
    stop(process)


def base_config(sys_tree: Path, proc_tree: Path, tmp_path: Path, **jobs: Any) -> dict[str, Any]:
    """A config with a fixed state dir and token, so a restarted daemon finds the journal."""
    return {
        "daemon": {"interval": 0.1, "state_dir": str(tmp_path / "state")},
        "api": {"token_file": str(tmp_path / "token")},
        "sources": {"sysfs_root": str(sys_tree), "procfs_root": str(proc_tree), "nvml": "off"},
        "jobs": jobs,
        "rules": [SLOW_RULE],
    }


def heat(sys_tree: Path, celsius: float) -> None:
    (sys_tree / PACKAGE).write_text(f"{int(celsius * 1000)}\n")


def kill_and_time(d: DaemonProcess, released: Callable[[], bool]) -> float:
    """SIGKILL the daemon; return how long until `released` held (fails past 2 s)."""
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    began = time.monotonic()
    d.proc.wait(10)
    while not released():
        elapsed = time.monotonic() - began
        assert elapsed < RELEASE_DEADLINE, f"still held {elapsed:.2f} s after kill -9\n{d.log()}"
        time.sleep(0.01)
    took = time.monotonic() - began
    RELEASE_TIMES.append(took)
    return took


def runs_free(pid: int) -> Callable[[], bool]:
    return lambda: state(pid) != "T"


def on_disk(state_dir: Path) -> Journal:
    """The journal as release-all reads it: the snapshot and the log of changes since."""
    journal = Journal(state_dir)
    assert journal.load() == []
    return journal


def holds(tmp_path: Path) -> dict[str, Any]:
    return on_disk(tmp_path / "state").holds()


def test_kill_9_while_paused_by_signal_and_restart_keeps_the_operator_hold(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path, tmp_path: Path,
        child: subprocess.Popen[bytes]) -> None:
    config = base_config(sys_tree, proc_tree, tmp_path)
    d = daemon(config)
    job = d.register(name="held", pid=child.pid)
    assert d.call("POST", f"/v1/jobs/{job['id']}/pause").status_code == 200
    assert state(child.pid) == "T"
    kill_and_time(d, runs_free(child.pid))
    stays(runs_free(child.pid), 0.3, what="the job stays released")
    assert holds(tmp_path) == {}, "the guardian dropped the holds it undid"
    again = daemon(config)
    (adopted,) = again.get("/v1/jobs").json()
    assert (adopted["id"], adopted["name"], adopted["held_by_operator"]) == (
        job["id"], "held", True)
    eventually(lambda: state(child.pid) == "T", what="the operator hold is back")


#: sleeps until the file named by argv[1] exists, then forks once; both go on sleeping
FORKS_LATER = """
import os, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
os.fork()
while True:
    time.sleep(0.1)
"""
#: the hierarchies cgroup mode may move a job's processes in
MOVED_IN = ("v2", "freezer", "cpu")


@pytest.fixture
def origin() -> Iterator[dict[str, Path]]:
    """Cgroups of the test's own, one in each hierarchy a job may be moved in: where a
    job's processes are before it is registered (a Slurm job's or a pod's cgroups)."""
    made = {}
    label = uuid.uuid4().hex[:8]
    for name, h in find_hierarchies().items():
        if name in MOVED_IN:
            made[name] = h.dir(f"/test-origin-{label}")
            made[name].mkdir()
    yield made
    for directory in made.values():
        eventually(lambda d=directory: not (d / "cgroup.procs").read_text().split(),
                   what=f"{directory} empties once the test's processes are gone")
        directory.rmdir()


@pytest.mark.skipif(not ROOT, reason="cgroups need root")
@pytest.mark.parametrize("version", ["v2", "v1"])
@pytest.mark.parametrize("how", ["unregister", "SIGTERM", "kill -9"])
def test_a_cgroup_job_goes_back_to_its_own_cgroups(
        how: str, version: str, daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        tmp_path: Path, origin: dict[str, Path]) -> None:
    """A job registered by pid in cgroup mode is moved into governor-<id>; unregistered,
    at a clean stop and after kill -9 (by the guardian), it and the child it forked there
    are back in the cgroups they came from, whose limits they live under, and the
    cgroups made for it are gone."""
    hierarchies = find_hierarchies()
    go = tmp_path / "go"
    job_process = subprocess.Popen([sys.executable, "-c", FORKS_LATER, str(go)])
    try:
        for directory in origin.values():
            (directory / "cgroup.procs").write_text(str(job_process.pid))
        came_from = {n: hierarchies[n].cgroup(d) for n, d in origin.items()}
        d = daemon(base_config(sys_tree, proc_tree, tmp_path, cgroup_version=version))
        job = d.register(name="moved", pid=job_process.pid, mode="cgroup")
        made = {n: hierarchies[n].dir(cgroup)
                for n, cgroup in process_cgroups(job_process.pid).items()
                if cgroup.endswith(f"/governor-{job['id']}")}
        assert made and set(made) <= set(origin), f"moved into governor-{job['id']}"
        go.touch()
        eventually(lambda: len(psutil.Process(job_process.pid).children()) == 1,
                   what="the job forks inside governor-<id>")
        pids = [job_process.pid, *(c.pid for c in psutil.Process(job_process.pid).children())]
        assert all(process_cgroups(pid)[n] == hierarchies[n].cgroup(made[n])
                   for pid in pids for n in made)
        assert d.call("POST", f"/v1/jobs/{job['id']}/pause").status_code == 200

        if how == "unregister":
            assert d.call("DELETE", f"/v1/jobs/{job['id']}").status_code == 204
        elif how == "SIGTERM":
            assert d.stop(signal.SIGTERM) == 0
        else:
            kill_and_time(d, lambda: not any(m.exists() for m in made.values()))

        for pid in pids:
            where = process_cgroups(pid)
            assert {n: where[n] for n in came_from} == came_from, (
                f"process {pid} is back where it came from after {how}\n{d.log()[-3000:]}")
        assert not any(m.exists() for m in made.values()), "governor-<id> is removed"
        eventually(lambda: holds(tmp_path) == {}, what="the journal lists nothing to undo")
    finally:
        stop(job_process)


def test_kill_9_while_slowing_by_signal(daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
                                        tmp_path: Path, child: subprocess.Popen[bytes]) -> None:
    d = daemon(base_config(sys_tree, proc_tree, tmp_path))
    job = d.register(name="slowed", pid=child.pid)
    heat(sys_tree, 95)
    eventually(lambda: d.job(job["id"])["state"] == "slowed")
    kill_and_time(d, runs_free(child.pid))
    stays(runs_free(child.pid), 0.5, what="no stop phase comes after the release")


@pytest.mark.skipif(not ROOT, reason="cgroups need root")
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_kill_9_while_frozen(version: str, daemon: StartDaemon, sys_tree: Path,
                             proc_tree: Path, tmp_path: Path,
                             child: subprocess.Popen[bytes]) -> None:
    config = base_config(sys_tree, proc_tree, tmp_path, cgroup_version=version)
    d = daemon(config)
    job = d.register(name="frozen", pid=child.pid, mode="cgroup")
    cgroup = Path(job["cgroup"])

    def frozen() -> bool:
        """Whether the job's process is in its frozen cgroup (a released one goes back to
        its own cgroups, and the emptied one is removed)."""
        if not cgroup.exists():
            return False
        if version == "v2":
            return "frozen 1" in (cgroup / "cgroup.events").read_text()
        return (cgroup / "freezer.state").read_text().strip() != "THAWED"

    assert d.call("POST", f"/v1/jobs/{job['id']}/pause").status_code == 200
    assert frozen()
    kill_and_time(d, lambda: not frozen())
    before = cpu_seconds(child.pid)
    eventually(lambda: cpu_seconds(child.pid) - before > 0.1, what="the job runs")
    again = daemon(config)
    (adopted,) = again.get("/v1/jobs").json()
    assert adopted["id"] == job["id"] and adopted["held_by_operator"] is True
    eventually(frozen, what="the operator hold is back after the restart")
    assert again.call("DELETE", f"/v1/jobs/{job['id']}").status_code == 204


@pytest.mark.skipif(not ROOT, reason="cgroups need root")
def test_kill_9_while_quota_limited(daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
                                    tmp_path: Path, child: subprocess.Popen[bytes]) -> None:
    d = daemon(base_config(sys_tree, proc_tree, tmp_path, cgroup_version="auto"))
    job = d.register(name="quota", pid=child.pid, mode="cgroup")
    heat(sys_tree, 95)
    eventually(lambda: d.job(job["id"])["state"] == "slowed")
    eventually(lambda: any(h.get("quota") for h in holds(tmp_path).values()))
    (entry,) = holds(tmp_path).values()
    quota = entry["quota"]
    limit = Path(quota["path"]) / ("cpu.max" if quota["version"] == "v2" else "cpu.cfs_quota_us")
    assert limit.read_text().strip() != quota["original"]

    def released() -> bool:
        """The quota restored, or the job moved back out of its limited cgroup and that
        removed."""
        try:
            return limit.read_text().strip() == quota["original"]
        except FileNotFoundError:
            return True

    kill_and_time(d, released)
    eventually(lambda: "governor-" not in Path(f"/proc/{child.pid}/cgroup").read_text(),
               what="the job is back in its own cgroups")
    before = time.monotonic(), cpu_seconds(child.pid)
    time.sleep(0.5)
    share = (cpu_seconds(child.pid) - before[1]) / (time.monotonic() - before[0])
    assert share > 0.4, f"after release the job runs unthrottled (used {share:.0%} of a core)"


@pytest.mark.skipif(not ROOT, reason="setting a power limit needs root")
def test_kill_9_while_a_power_cap_is_set(daemon: StartDaemon, sys_tree: Path,
                                         proc_tree: Path, tmp_path: Path,
                                         c_nvml: CNvmlState) -> None:
    """A GPU capped by a power_cap rule (through the real pynvml on the C fake's driver
    library) gets its limit back from the guardian when the daemon is killed."""
    gpus = {"gpus": [h100(0, temperature=60)]}
    c_nvml.write(gpus)
    config = base_config(sys_tree, proc_tree, tmp_path)
    config["sources"]["nvml"] = "required"
    config["rules"] = [{"name": "cap", "metric": "gpu_temperature_celsius", "above": 80.0,
                        "for": 0, "clear_below": 75.0, "action": "power_cap",
                        "power_cap_watts": 250}]
    d = daemon(config, c_nvml=c_nvml)
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        d.register(name="on-gpu0", pid=sleeper.pid, devices=["gpu0"])
        gpus["gpus"][0]["temperature"] = 85
        c_nvml.write(gpus)
        eventually(lambda: c_nvml.limits() == {0: 250000}, what="the GPU is capped")
        assert holds(tmp_path)["power_cap:0"]["kind"] == "power_cap"
        kill_and_time(d, lambda: c_nvml.limits() == {0: 700000})
        eventually(lambda: holds(tmp_path) == {}, what="the guardian drops what it undid")
        assert c_nvml.limits() == {0: 700000}, "the limit the GPU had before, still hot"
    finally:
        stop(sleeper)


def test_twenty_kills_at_random_moments_of_a_duty_cycle(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path, tmp_path: Path,
        child: subprocess.Popen[bytes]) -> None:
    """The same job, adopted by each new daemon and slowed again, is killed under at a
    random point of its 100 ms cycle, twenty times; each time it ends up running."""
    config = base_config(sys_tree, proc_tree, tmp_path)
    heat(sys_tree, 95)
    rng = random.Random(4)
    job_id = None
    for kill in range(20):
        d = daemon(config)
        if job_id is None:
            job_id = d.register(name="cycled", pid=child.pid)["id"]
        eventually(lambda d=d, job_id=job_id: d.job(job_id)["state"] == "slowed")
        time.sleep(0.2 + rng.random() * 0.1)  # a random phase of the cycle
        kill_and_time(d, runs_free(child.pid))
        stays(runs_free(child.pid), 0.3, what=f"released after kill {kill + 1}")
    print(f"\n20 kills in a duty cycle: released in {min(RELEASE_TIMES) * 1000:.0f}.."
          f"{max(RELEASE_TIMES) * 1000:.0f} ms")


@pytest.mark.skipif(not ROOT, reason="cgroups need root")
def test_sigterm_releases_everything_and_exits_0(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path, tmp_path: Path,
        child: subprocess.Popen[bytes]) -> None:
    other = busy_child()
    try:
        d = daemon(base_config(sys_tree, proc_tree, tmp_path))
        stopped = d.register(name="stopped", pid=child.pid)
        frozen = d.register(name="frozen", pid=other.pid, mode="cgroup")
        for job in (stopped, frozen):
            assert d.call("POST", f"/v1/jobs/{job['id']}/pause").status_code == 200
        assert state(child.pid) == "T"
        assert d.stop(signal.SIGTERM) == 0
        assert state(child.pid) != "T"
        assert not Path(frozen["cgroup"]).exists(), "thawed, emptied and removed"
        assert "governor-" not in Path(f"/proc/{other.pid}/cgroup").read_text()
        assert state(other.pid) != "T"
        assert holds(tmp_path) == {}
        jobs = on_disk(tmp_path / "state").jobs()
        assert set(jobs) == {stopped["id"], frozen["id"]}, "registrations survive a stop"
    finally:
        stop(other)


@pytest.mark.parametrize("config_since", ["unchanged", "a rule broken since the start"])
def test_release_all_without_daemon_or_guardian(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path, tmp_path: Path,
        child: subprocess.Popen[bytes], config_since: str) -> None:
    """If the guardian dies with the daemon, release-all (systemd's ExecStopPost) is the
    way back, even when someone has broken a rule in the file since the daemon started
    (it needs only the state directory); releasing twice is harmless."""
    d = daemon(base_config(sys_tree, proc_tree, tmp_path))
    if config_since != "unchanged":
        d.config_path.write_text(d.config_path.read_text() + "\n[[rules]]\nname = 'x'\n")
    job = d.register(name="left", pid=child.pid)
    d.call("POST", f"/v1/jobs/{job['id']}/pause")
    assert d.proc is not None
    daemon_process = psutil.Process(d.proc.pid)
    (guardian,) = daemon_process.children()
    guardian.kill()
    guardian.wait(5)
    # the daemon notices its guardian died and starts a new one
    eventually(lambda: [p.pid for p in daemon_process.children()] not in ([], [guardian.pid]))
    # now both at once: freeze the daemon so it cannot start a third, kill its guardian,
    # then the daemon
    daemon_process.suspend()
    (second,) = daemon_process.children()
    second.kill()  # a zombie until its frozen parent dies; it runs nothing more
    d.proc.kill()
    d.proc.wait()
    assert state(child.pid) == "T", "nothing released it yet"
    first = d.cli("release-all")
    assert first.returncode == 0, first.stderr
    assert f"signal:{job['id']}: job {job['id']}: continued 1 processes" in first.stdout
    assert state(child.pid) != "T"
    second_run = d.cli("release-all")
    assert second_run.returncode == 0
    assert "nothing to release" in second_run.stdout


@pytest.mark.parametrize("damage", ["{garbage", '{"version": 1, "jobs": {"x": ', ""])
def test_a_corrupt_journal_is_kept_and_the_daemon_starts(
        damage: str, daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "journal.json").write_text(damage)
    d = daemon(base_config(sys_tree, proc_tree, tmp_path))
    assert d.get("/healthz").status_code == 200
    assert d.get("/v1/jobs").json() == []
    kept = state_dir / "journal.json.corrupt-0"
    assert kept.read_text() == damage
    d.stop()
    assert "is unreadable" in d.log() and "journal.json.corrupt-0" in d.log()


def test_a_second_daemon_on_the_same_state_dir_refuses(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path, tmp_path: Path) -> None:
    config = base_config(sys_tree, proc_tree, tmp_path)
    first = daemon(config)
    second = daemon(config, wait=False)
    assert second.proc is not None
    assert second.proc.wait(30) == 1
    assert first.proc is not None
    assert (f"governor: daemon.state_dir: another governor (pid {first.proc.pid}) is using "
            f"{tmp_path / 'state'}") in second.log()
    assert first.get("/healthz").status_code == 200


def test_the_guardian_is_protected(daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
                                   tmp_path: Path) -> None:
    d = daemon(base_config(sys_tree, proc_tree, tmp_path))
    assert d.proc is not None
    (guardian,) = psutil.Process(d.proc.pid).children()
    response = d.call("POST", "/v1/jobs", json={"name": "guardian", "pid": guardian.pid})
    assert response.status_code == 403
    assert response.json() == {"error": f"Pid {guardian.pid} belongs to the governor."}
    assert guardian.status() != psutil.STATUS_STOPPED


def test_guardian_runs_the_same_release_as_release_all(tmp_path: Path) -> None:
    """The guardian as a plain process: it waits on its pipe, then releases."""
    target = busy_child()
    try:
        os.kill(target.pid, signal.SIGSTOP)
        journal = Journal(tmp_path)
        started = psutil.Process(target.pid).create_time()
        journal.put_hold("signal:x", {"kind": "signal", "job": "x", "state": "stopped",
                                      "processes": [[target.pid, started]]})
        read_fd, write_fd = os.pipe()
        guardian = subprocess.Popen([sys.executable, "-m", "governor.safety.guardian",
                                     str(tmp_path), str(read_fd)], pass_fds=[read_fd])
        os.close(read_fd)
        time.sleep(0.3)
        assert state(target.pid) == "T", "the guardian waits while the daemon lives"
        os.close(write_fd)
        assert guardian.wait(10) == 0
        assert state(target.pid) != "T"
        assert on_disk(tmp_path).holds() == {}
    finally:
        stop(target)


def teardown_module() -> None:
    if RELEASE_TIMES:
        print(f"\nkill -9: {len(RELEASE_TIMES)} kills, every job released in "
              f"{min(RELEASE_TIMES) * 1000:.0f}..{max(RELEASE_TIMES) * 1000:.0f} ms "
              f"(median {sorted(RELEASE_TIMES)[len(RELEASE_TIMES) // 2] * 1000:.0f} ms)")
