"""The shipped unit under a real systemd: installed with `make install`, started, reloaded,
restarted by its watchdog and after a SIGKILL, and doing its job despite its hardening.

systemd 252 runs as PID 1 of new PID, mount, UTS and IPC namespaces
(tests/support/isolated_systemd.sh, which keeps the host's files safe from it). Governor
runs there as an operator installs it; the test reaches it over 127.0.0.1, its unix
socket, `nsenter ... systemctl`, and its files under /proc/<systemd>/root. Its rules watch
a fixture sysfs tree inside the namespace, which a test heats by writing a sensor file.
Jobs are real processes in its PID namespace, owned by `nobody`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.daemon import free_port, to_toml
from tests.support.isolated_systemd import IsolatedSystemd, children, why_not
from tests.support.processes import eventually
from tests.support.ttar import unpack

REASON = why_not()
#: the first test also boots systemd and runs `make install`, which downloads the
#: dependencies when pip's cache is cold
pytestmark = [pytest.mark.skipif(REASON is not None, reason=REASON or ""),
              pytest.mark.timeout(600)]

FIXTURES = Path(__file__).parent / "fixtures"
HWMON = "devices/platform/coretemp.0/hwmon/hwmon0"
PACKAGE, CORE0 = f"{HWMON}/temp1_input", f"{HWMON}/temp2_input"
CHIP = {"chip": "platform_coretemp_0"}
CPU_HOT = {"name": "cpu-hot", "metric": "cpu_temperature_celsius",
           "match": {**CHIP, "sensor": "Package id 0"}, "above": 80.0, "for": 0,
           "clear_below": 70.0, "clear_for": 0, "action": "pause"}
CPU_WARM = {"name": "cpu-warm", "metric": "cpu_temperature_celsius",
            "match": {**CHIP, "sensor": "Core 0"}, "above": 70.0, "for": 0,
            "clear_below": 60.0, "clear_for": 0, "action": "slow", "speed": 0.5}
NOBODY = "65534"


@pytest.fixture(scope="module")
def systemd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IsolatedSystemd]:
    booted = IsolatedSystemd(tmp_path_factory.mktemp("systemd")).boot()  # shuts down on failure
    try:
        yield booted
    finally:
        booted.shutdown()


def host_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("gone" once it has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rindex(")") + 2]


class Service:
    """governor.service inside the isolated systemd, as a test drives it."""

    def __init__(self, systemd: IsolatedSystemd):
        self.systemd = systemd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.fixture = systemd.root / "run/governor-test"
        shutil.rmtree(self.fixture / "sys", ignore_errors=True)
        unpack(FIXTURES / "sys.ttar", self.fixture)
        self.jobs: list[subprocess.Popen[bytes]] = []

    # ---- config and sensors ----

    def write_config(self, *rules: dict[str, Any], **sections: dict[str, Any]) -> None:
        config: dict[str, Any] = {
            "daemon": {"interval": 0.25, "state_dir": "/var/lib/governor"},
            "api": {"listen": f"127.0.0.1:{self.port}", "token_file": "/var/lib/governor/token",
                    "socket": "/run/governor/governor.sock"},
            "sources": {"sysfs_root": "/run/governor-test/sys", "nvml": "off"},
            "rules": list(rules) or [CPU_HOT],
        }
        for name, body in sections.items():
            config.setdefault(name, {}).update(body)
        (self.systemd.root / "etc/governor/governor.toml").write_text(to_toml(config))

    def heat(self, celsius: float, sensor: str = PACKAGE) -> None:
        (self.fixture / "sys" / sensor).write_text(f"{int(celsius * 1000)}\n")

    # ---- the unit ----

    def start(self) -> None:
        result = self.systemd.systemctl("start", "governor", timeout=120)
        assert result.returncode == 0, (result.stderr, self.systemd.daemon_log())

    def props(self, *names: str) -> dict[str, str]:
        return self.systemd.show("governor.service", *names)

    def main_pid(self) -> int:
        """The daemon's host pid (0 while it has none)."""
        inner = int(self.props("MainPID")["MainPID"])
        return (self.systemd.host_pid(inner) or 0) if inner else 0

    def status_text(self) -> str:
        return self.props("StatusText")["StatusText"]

    # ---- the API ----

    @property
    def token(self) -> str:
        return (self.systemd.root / "var/lib/governor/token").read_text().strip()

    def get(self, path: str) -> Any:
        response = httpx.get(self.url + path, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def answers(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
        return False

    def register(self, **body: Any) -> dict[str, Any]:
        response = httpx.post(self.url + "/v1/jobs", json=body, timeout=10,
                              headers={"Authorization": f"Bearer {self.token}"})
        assert response.status_code == 201, response.text
        return dict(response.json())

    def job(self, job_id: str) -> dict[str, Any] | None:
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{self.url}/v1/jobs/{job_id}", timeout=2)
            if response.status_code == 200:
                return dict(response.json())
        return None

    # ---- jobs: sleeping processes owned by nobody, inside its PID namespace ----

    def start_job(self) -> tuple[int, int]:
        """(host pid, the pid governor sees)."""
        waiter, host, inner = self.systemd.start_job(["sleep", "infinity"], user=NOBODY)
        self.jobs.append(waiter)
        assert os.stat(f"/proc/{host}").st_uid == int(NOBODY)
        return host, inner

    def stop_jobs(self) -> None:
        for waiter in self.jobs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(waiter.pid, signal.SIGKILL)
            for pid in children(waiter.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            waiter.wait(10)


@pytest.fixture
def service(systemd: IsolatedSystemd) -> Iterator[Service]:
    """A fresh service for each test: stopped, its drop-ins and state gone afterwards. A
    job still alive when the service stops must be left running."""
    svc = Service(systemd)
    try:
        yield svc
    finally:
        try:
            systemd.systemctl("stop", "governor", timeout=120)
            for waiter in svc.jobs:
                for pid in children(waiter.pid):
                    assert host_state(pid) != "T", f"job {pid} left stopped by the stop"
        finally:
            svc.stop_jobs()
            systemd.systemctl("reset-failed", "governor")
            for dropin in (systemd.root / "run/systemd/system/governor.service.d").glob(
                    "test-*.conf"):
                dropin.unlink()
            systemd.systemctl("daemon-reload")
            state = systemd.root / "var/lib/governor"
            if state.exists():
                for entry in state.iterdir():
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            systemd.check_canary()


def watch_job(pid: int, until: Callable[[], bool], timeout: float = 60.0) -> list[str]:
    """The job's states, each once in the order seen, polled every 10 ms until `until`."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not until():
        letter = host_state(pid)
        if not seen or seen[-1] != letter:
            seen.append(letter)
        assert time.monotonic() < deadline, f"not done after {timeout} s; job states {seen}"
        time.sleep(0.01)
    return seen


def test_it_is_active_only_after_ready_and_status_shows_the_summary(
        systemd: IsolatedSystemd, service: Service) -> None:
    service.write_config()
    systemd.systemctl("start", "--no-block", "governor", check=True)
    before: list[str] = []
    deadline = time.monotonic() + 60
    while (state := service.props("ActiveState")["ActiveState"]) != "active":
        assert state in ("inactive", "activating"), (state, systemd.daemon_log())
        before.append(state)
        assert time.monotonic() < deadline, f"not active after 60 s:\n{systemd.daemon_log()}"
        time.sleep(0.02)
    # READY=1 is sent once the first round is done and the API listens: both are true the
    # moment systemd calls it active
    assert "activating" in before, "Type=notify: activating until READY=1"
    status = service.get("/v1/status")
    assert status["sequence"] is not None, "the first round was done before READY"
    shown = systemd.systemctl("status", "governor").stdout
    assert "active (running)" in shown, shown
    assert 'Status: "0 GPUs, 0 jobs, 0 rules tripped"' in shown, shown

    host, inner = service.start_job()
    service.register(name="trainer", pid=inner)
    service.heat(95)
    eventually(lambda: host_state(host) == "T", what="the rule pauses the job")
    eventually(lambda: "1 job (1 paused), 1 rule tripped" in service.status_text(),
               what=f"STATUS tells the paused job: {service.status_text()!r}")
    assert "1 job (1 paused), 1 rule tripped" in systemd.systemctl("status", "governor").stdout


def test_reload_rereads_the_config_and_a_broken_file_keeps_the_old_one(
        systemd: IsolatedSystemd, service: Service) -> None:
    service.write_config(CPU_HOT)
    service.start()
    assert [r["name"] for r in service.get("/v1/rules")] == ["cpu-hot"]

    service.write_config(CPU_HOT, CPU_WARM)
    systemd.systemctl("reload", "governor", check=True)
    eventually(lambda: [r["name"] for r in service.get("/v1/rules")] == ["cpu-hot", "cpu-warm"],
               what="the reloaded rules are in force")
    eventually(lambda: service.props("ActiveState")["ActiveState"] == "active")

    config = systemd.root / "etc/governor/governor.toml"
    config.write_text(config.read_text().replace("above = 70.0", "above = 'x'"))
    systemd.systemctl("reload", "governor", check=True)
    failed = "reload failed, running the previous config"
    eventually(lambda: failed in service.status_text(),
               what=f"the status says the reload failed: {service.status_text()!r}")
    assert "above" in service.status_text(), "it names the key"
    shown = systemd.systemctl("status", "governor").stdout
    assert "active (running)" in shown and failed in shown, shown
    assert [r["name"] for r in service.get("/v1/rules")] == ["cpu-hot", "cpu-warm"], (
        "the old config stays in force")


def test_the_watchdog_restarts_a_stalled_loop_and_the_jobs_are_released_meanwhile(
        systemd: IsolatedSystemd, service: Service) -> None:
    systemd.write_dropin("governor.service", "test-watchdog.conf",
                         "[Service]\nWatchdogSec=2s\n")
    service.write_config()
    service.start()
    host, inner = service.start_job()
    job = service.register(name="trainer", pid=inner)
    service.heat(95)
    eventually(lambda: host_state(host) == "T", what="the rule pauses the job")
    frozen = service.main_pid()
    restarts = int(service.props("NRestarts")["NRestarts"])

    os.kill(frozen, signal.SIGSTOP)  # the loop stops: no more WATCHDOG=1

    def taken_back() -> bool:
        adopted = service.job(job["id"])
        return (service.main_pid() not in (0, frozen) and adopted is not None
                and adopted["state"] == "paused" and host_state(host) == "T")

    seen = watch_job(host, taken_back)
    assert host_state(frozen) == "gone", "the watchdog ended the stalled daemon"
    assert int(service.props("NRestarts")["NRestarts"]) == restarts + 1
    # it was stopped (T) before the freeze and taken_back saw it stopped again: a sleeping
    # state in between is the release (the first poll may already see it, under load)
    assert "S" in seen, (
        f"released while governor was down, then held again: {seen}\n{systemd.daemon_log()}")
    log = systemd.daemon_log()
    assert re.search(r"guardian: the daemon is gone; .*continued", log), (
        f"the guardian released the job as soon as the daemon died:\n{log[-3000:]}")


def test_a_killed_service_leaves_the_job_running_and_the_restarted_one_adopts_it(
        systemd: IsolatedSystemd, service: Service) -> None:
    service.write_config()
    service.start()
    host, inner = service.start_job()
    job = service.register(name="trainer", pid=inner, mode="cgroup")
    service.heat(95)
    eventually(lambda: _frozen(host), what="the job's cgroup is frozen")
    killed = service.main_pid()
    restarts = int(service.props("NRestarts")["NRestarts"])

    systemd.systemctl("kill", "-s", "KILL", "governor", check=True)  # daemon and guardian

    def taken_back() -> bool:
        adopted = service.job(job["id"])
        return (service.main_pid() not in (0, killed) and adopted is not None
                and adopted["state"] == "paused" and _frozen(host))

    thawed: list[bool] = []

    def watched() -> bool:
        thawed.append(not _frozen(host))
        return taken_back()

    watch_job(host, watched)
    assert any(thawed), "ExecStopPost=governor release-all thawed the job while it was down"
    assert int(service.props("NRestarts")["NRestarts"]) == restarts + 1, (
        "Restart=on-failure brought it back")
    log = systemd.daemon_log()
    assert re.search(rf"cgroup hold of job {job['id']}: thawed \S+/governor-{job['id']}", log), (
        f"release-all (ExecStopPost) says what it undid:\n{log[-3000:]}")


def _unified_root() -> Path:
    """Where the cgroup2 hierarchy is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified
    on a hybrid machine like this one."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            return Path(fields[4])
    return Path("/sys/fs/cgroup")


def _frozen(pid: int) -> bool:
    """Whether the job's cgroup is frozen: by the v2 freezer (cgroup.events says
    "frozen 1"; governor uses it beside its own cgroup, which systemd puts in the v2
    hierarchy even on a hybrid machine) or by the v1 freezer (freezer.state)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if path == "/":
                continue
            if controllers == "":
                events = (_unified_root() / path.lstrip("/") / "cgroup.events").read_text()
                if "frozen 1" in events.splitlines():
                    return True
            elif "freezer" in controllers.split(","):
                state = Path("/sys/fs/cgroup/freezer") / path.lstrip("/") / "freezer.state"
                if state.read_text().strip() == "FROZEN":
                    return True
    return False


def _cgroup_file(pid: int, controller: str, name: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return (Path("/sys/fs/cgroup") / controllers / path.lstrip("/") / name
                    ).read_text().strip()
    raise AssertionError(f"process {pid} is in no {controller} cgroup")


def test_the_hardening_leaves_it_able_to_do_its_job(
        systemd: IsolatedSystemd, service: Service) -> None:
    """Signal another user's process, freeze and limit a job's cgroup (frozen by the v2
    freezer beside the service's cgroup, limited by the v1 CPU quota here), write its
    state directory, serve its socket: all under ProtectSystem=strict, the capability
    bounding set and the system call filter."""
    service.write_config(CPU_HOT, CPU_WARM)
    service.start()

    signalled, signalled_inner = service.start_job()
    service.register(name="by-signal", pid=signalled_inner, mode="signal")
    held, held_inner = service.start_job()
    cgroup_job = service.register(name="by-cgroup", pid=held_inner, mode="cgroup")
    assert re.search(r"/governor-", Path(f"/proc/{held}/cgroup").read_text()), (
        "moved into a cgroup of its own")

    service.heat(75, CORE0)  # cpu-warm: slow to 0.5
    eventually(lambda: _cgroup_file(held, "cpu", "cpu.cfs_quota_us") != "-1",
               what="the slowed job's CPU quota is set")
    quota = int(_cgroup_file(held, "cpu", "cpu.cfs_quota_us"))
    assert quota > 0
    service.heat(95)  # cpu-hot: pause
    eventually(lambda: _frozen(held), what="the job's cgroup is frozen")
    eventually(lambda: host_state(signalled) == "T",
               what="the job owned by nobody is stopped by SIGSTOP")
    assert service.job(cgroup_job["id"])["state"] == "paused"  # type: ignore[index]

    service.heat(55)
    service.heat(50, CORE0)
    eventually(lambda: not _frozen(held) and host_state(signalled) != "T",
               what="both jobs run again once cooled")
    eventually(lambda: _cgroup_file(held, "cpu", "cpu.cfs_quota_us") == "-1",
               what="the quota is lifted")

    state = systemd.root / "var/lib/governor"
    assert state.stat().st_mode & 0o777 == 0o700, "StateDirectoryMode=0700"
    written = {p.name for p in state.iterdir()}
    assert "token" in written and any("journal" in name for name in written), written
    assert (state / "audit.jsonl").stat().st_size > 0, "the audit log is written"

    socket = systemd.root / "run/governor/governor.sock"
    assert (systemd.root / "run/governor").stat().st_mode & 0o777 == 0o750
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), timeout=10) as client:
        response = client.get("http://governor/v1/status")
    assert response.status_code == 200 and len(response.json()["jobs"]) == 2

    cli = systemd.inside("governor", "status", check=True).stdout
    assert "by-signal" in cli and "by-cgroup" in cli, cli
