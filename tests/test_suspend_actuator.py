"""Suspend mode against Slurm's suspend under proctrack/linuxproc or pgid, where Slurm
stops a job with SIGSTOP and its user may undo that with SIGCONT.

The test cluster (tests/support/slurm_cluster.py) runs proctrack/cgroup, whose freezer no
user can thaw, so Slurm here is the stand-in scontrol on PATH
(tests/support/fake_scontrol.py): its `suspend` and `resume` send SIGSTOP and SIGCONT to
the job's process as slurmd does under linuxproc, and its `show job` says the state they
left. The job is a real process of `nobody`, continued by `nobody` as its user would;
the journal is real, and the actuator's worker really forks scontrol. The last test runs
the daemon, discovering the job through the same scontrol from a spool of its own.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from governor.actuators.signal import SignalActuator
from governor.actuators.suspend import SuspendActuator
from governor.host import procfs
from governor.host.slurm import SlurmSite
from governor.jobs.model import RUN, Directive, Job, Mode, pause
from governor.jobs.process import identify
from governor.safety.journal import Journal
from tests.support.c_nvml import CNvmlState
from tests.support.daemon import DaemonProcess, wait_for
from tests.support.fake_nvml import h100
from tests.support.fake_scontrol import FakeScontrol

NOBODY = 65534
HOT = pause("gpu-hot")


@dataclass
class Setup:
    fake: FakeScontrol
    child: subprocess.Popen[bytes]
    job: Job
    actuator: SuspendActuator
    journal: Journal
    reports: list[str]

    def rounds(self, directive: Directive, until: Callable[[], object], what: str,
               timeout: float = 20.0) -> None:
        """Apply the directive once a round until `until` holds."""
        deadline = time.monotonic() + timeout
        while True:
            self.actuator.apply(self.job, directive)
            if until():
                return
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.05)

    def state(self) -> bytes:
        return procfs.state(self.child.pid)

    def users_sigcont(self) -> None:
        """What the job's user may do under linuxproc: continue their own process."""
        subprocess.run(["sh", "-c", f"kill -CONT {self.child.pid}"], user=NOBODY,
                       check=True)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    fake = FakeScontrol(tmp_path / "scontrol", monkeypatch)
    child = subprocess.Popen(["sleep", "1000"], user=NOBODY)
    fake.job("7", state="RUNNING")
    fake.pids("7", [child.pid])
    found = identify(child.pid)
    assert found is not None
    job = Job(id="j1", name="sim", mode=Mode.SUSPEND, pid=child.pid,
              pid_started_at=found.started_at, cgroup=None, devices=(), priority=0,
              registered_at=time.time(), source="slurm", scheduler_id="7", user="nobody")
    journal = Journal(tmp_path / "state")
    reports: list[str] = []
    actuator = SuspendActuator(journal, SignalActuator(journal), site=SlurmSite(),
                               report=lambda _job, what: reports.append(what))
    actuator.attach(job)
    try:
        yield Setup(fake, child, job, actuator, journal, reports)
    finally:
        actuator.close()
        child.kill()
        child.wait()


def suspended_and_continued_by_user(s: Setup) -> None:
    """Governor suspends the job through Slurm, then its user continues it and governor
    stops it again."""
    s.rounds(HOT, lambda: s.fake.state("7") == "SUSPENDED" and s.state() == b"T",
             "Slurm's suspend")
    assert set(s.journal.holds()) == {"slurm:j1"}
    s.rounds(HOT, lambda: True, "a round that sees it suspended")
    s.users_sigcont()
    s.rounds(HOT, lambda: s.reports and s.state() == b"T", "the job stopped again")


def test_a_users_sigcont_under_slurms_suspend_is_stopped_again_journalled_and_reported(
        setup: Setup) -> None:
    """Slurm still says SUSPENDED, so the continue was not a resume: governor stops the
    processes again by SIGSTOP, journalled as a signal hold, reports it once a pause
    however often the user continues, and lets both holds go when the pause ends."""
    s = setup
    suspended_and_continued_by_user(s)
    assert s.reports == ["outside-continue"]
    assert s.job.outside is None, "not resumed: the job is held as ever"
    assert s.fake.state("7") == "SUSPENDED"
    holds = s.journal.holds()
    assert set(holds) == {"slurm:j1", "suspend:j1"}
    assert holds["suspend:j1"]["kind"] == "signal"
    assert [pid for pid, _ in holds["suspend:j1"]["processes"]] == [s.child.pid]

    for _ in range(2):
        s.rounds(HOT, lambda: True, "a round that sees it stopped")
        s.users_sigcont()
        s.rounds(HOT, lambda: s.state() == b"T", "the job stopped again")
    assert s.reports == ["outside-continue"], "reported once a pause"
    assert "resume 7" not in s.fake.calls()

    s.rounds(RUN, lambda: not s.journal.holds() and s.state() != b"T",
             "both holds let go")
    assert s.fake.state("7") == "RUNNING"
    assert s.fake.calls().count("resume 7") == 1


def test_an_administrators_resume_after_a_users_sigcont_is_still_yielded_to(
        setup: Setup) -> None:
    """Once the processes run again and Slurm says RUNNING, an administrator resumed the
    job: governor lets go of its signal hold too, and holds it no more this pause."""
    s = setup
    suspended_and_continued_by_user(s)
    s.rounds(HOT, lambda: True, "a round that sees it stopped")
    subprocess.run(["scontrol", "resume", "7"], check=True)
    s.rounds(HOT, lambda: "outside-resume" in s.reports and s.state() != b"T",
             "the administrator's resume yielded to")
    assert s.reports == ["outside-continue", "outside-resume"]
    assert s.job.outside == "resumed"
    assert not s.journal.holds()
    for _ in range(5):
        s.rounds(HOT, lambda: True, "a round")
        time.sleep(0.05)
    assert s.state() != b"T", "not held again this pause"
    assert "suspend 7" in s.fake.calls() and s.fake.calls().count("suspend 7") == 1


def test_the_daemon_audits_a_users_sigcont_as_an_outside_continue_not_a_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, c_nvml: CNvmlState,
        daemon: Callable[..., DaemonProcess]) -> None:
    """Discovered, suspended on a hot GPU, continued by its user: the audit log says
    `outside-continue`, the job stays paused (its processes stopped), and no outside
    resume is counted or shown."""
    fake = FakeScontrol(tmp_path / "scontrol", monkeypatch)
    spool = tmp_path / "spool"
    spool.mkdir()
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"SlurmdSpoolDir={spool}\nProctrackType=proctrack/linuxproc\n")
    child = subprocess.Popen(["sleep", "1000"], user=NOBODY)
    try:
        fake.job("7", name="sim", state="RUNNING", gres="gpu:1(IDX:0)")
        fake.pids("7", [child.pid])
        (spool / "node1_7.0").touch()
        gpus: dict[str, Any] = {"gpus": [h100(0, temperature=60), h100(1, temperature=60)]}
        c_nvml.write(gpus)
        rule = {"name": "gpu-hot", "metric": "gpu_temperature_celsius", "above": 85.0,
                "for": 0, "clear_below": 75.0, "action": "pause"}
        d = daemon({"daemon": {"interval": 0.25},
                    "slurm": {"discover": True, "conf": str(conf), "nodes": ["node1"]},
                    "rules": [rule]}, c_nvml=c_nvml)
        job = wait_for(lambda: [j for j in d.get("/v1/jobs").json()
                                if j.get("scheduler_id") == "7"], 10.0, "job 7", d)[0]
        assert (job["mode"], job["devices"]) == ("suspend", ["gpu0"])
        gpus["gpus"][0]["temperature"] = 95
        c_nvml.write(gpus)
        wait_for(lambda: fake.state("7") == "SUSPENDED"
                 and procfs.state(child.pid) == b"T", 10.0, "Slurm's suspend", d)
        d.wait_rounds(2)
        subprocess.run(["sh", "-c", f"kill -CONT {child.pid}"], user=NOBODY, check=True)

        def audited() -> list[dict[str, Any]]:
            return [e for e in d.get("/v1/events").json()["events"]
                    if e["what"].startswith("outside-")]
        (event,) = wait_for(audited, 10.0, "an outside-continue audit event", d)
        assert (event["what"], event["job"]["id"]) == ("outside-continue", job["id"])
        assert "continued while slurm still held it suspended" in " ".join(
            event["why"]["reasons"])
        wait_for(lambda: procfs.state(child.pid) == b"T", 10.0, "stopped again", d)
        d.wait_rounds(4)
        assert procfs.state(child.pid) == b"T"
        shown = d.get(f"/v1/jobs/{job['id']}").json()
        assert (shown["state"], shown.get("outside")) == ("paused", None)
        assert [e["what"] for e in audited()] == ["outside-continue"]
        assert 'governor_outside_resumes_total{source="slurm"} 1.0' not in d.metrics()
        assert fake.state("7") == "SUSPENDED"
    finally:
        child.kill()
        child.wait()
