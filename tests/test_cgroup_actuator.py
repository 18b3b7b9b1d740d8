"""The cgroup actuator on real processes and real cgroups (v2 and v1, as mounted here)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import posixpath
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import psutil
import pytest

from governor.actuators.base import ActuatorError, hold_key
from governor.actuators.cgroup import (
    EXTRA_KEY,
    CgroupActuator,
    find_hierarchies,
    memberships,
    undo,
)
from governor.control.laws import FEEDBACK_PERIODS
from governor.jobs.model import RUN, Job, Mode, pause, slow
from governor.jobs.process import identify
from governor.safety.journal import Journal

HIERARCHIES = find_hierarchies()
OWN = memberships(Path("/proc/self/cgroup"))
BUSY = "while True: pass"
#: waits for the file named by argv[1], then forks a child that forks a grandchild; all spin
FORKS_LATER = """
import os, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
if os.fork() == 0:
    os.fork()
while True:
    pass
"""
#: the hierarchies each version holds a pid's tree in, here
USED = {"v2": ["v2"], "v1": ["freezer", "cpu"]}


def needs(*names: str) -> pytest.MarkDecorator:
    missing = [n for n in names if n not in HIERARCHIES]
    reason = ("changing cgroups needs root" if os.geteuid() != 0 else
              f"no cgroup hierarchy {', '.join(missing)} is mounted" if missing else "")
    return pytest.mark.skipif(bool(reason), reason=reason or "runs")


def v2_has_cpu() -> bool:
    v2 = HIERARCHIES.get("v2")
    if v2 is None:
        return False
    parent = v2.dir(posixpath.dirname(OWN.get("v2", "/")))
    return "cpu" in (parent / "cgroup.controllers").read_text().split()


VERSIONS = [pytest.param("v2", marks=needs("v2")),
            pytest.param("v1", marks=needs("freezer", "cpu"))]


def actuator_for(journal: Journal, version: str) -> CgroupActuator:
    return CgroupActuator(journal, version="v2" if version == "v2" else "v1")


def created_dir(name: str, job: Job) -> Path:
    """Where the actuator makes the cgroup of a job in a hierarchy: beside the test's own."""
    h = HIERARCHIES[name]
    return h.dir(posixpath.join(posixpath.dirname(OWN.get(name, "/")), f"governor-{job.id}"))


def is_frozen(version: str, directory: Path) -> bool:
    if version == "v2":
        return "frozen 1" in (directory / "cgroup.events").read_text().splitlines()
    return (directory / "freezer.state").read_text().strip() == "FROZEN"


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def cpu_advance(pids: list[int], seconds: float = 0.5) -> float:
    before = cpu_seconds(pids)
    time.sleep(seconds)
    return cpu_seconds(pids) - before


def wait_for(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def is_empty(cgroup: Path) -> bool:
    return not (cgroup / "cgroup.procs").read_text().split()


def tree_pids(pid: int) -> list[int]:
    return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]


class Rig:
    """Starts children and attaches jobs, and undoes all of it whatever the test did."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.journal = Journal(tmp_path / "state")
        self.children: list[subprocess.Popen[bytes]] = []
        self.attached: list[tuple[CgroupActuator, Job]] = []
        self.cgroups: list[Path] = []

    def spawn(self, code: str = BUSY, *args: str) -> subprocess.Popen[bytes]:
        child = subprocess.Popen([sys.executable, "-c", code, *args])
        self.children.append(child)
        return child

    def job(self, pid: int | None = None, cgroup: str | None = None) -> Job:
        identity = identify(pid) if pid is not None else None
        return Job(id=uuid.uuid4().hex[:12], name="test", mode=Mode.CGROUP, pid=pid,
                   pid_started_at=identity.started_at if identity else None, cgroup=cgroup,
                   devices=(), priority=0, registered_at=time.time())

    def attach(self, actuator: CgroupActuator, job: Job) -> Job:
        actuator.attach(job)
        self.attached.append((actuator, job))
        return job

    def cgroup(self, name: str, label: str) -> Path:
        """A cgroup of the test's own, beside the test process's cgroup."""
        h = HIERARCHIES[name]
        directory = h.dir(posixpath.join(posixpath.dirname(OWN.get(name, "/")),
                                         f"governor-test-{label}"))
        directory.mkdir()
        self.cgroups.append(directory)
        return directory

    def close(self) -> None:
        for actuator, job in self.attached:
            actuator.detach(job)
        for child in self.children:
            try:
                pids = tree_pids(child.pid)
            except psutil.NoSuchProcess:
                pids = []
            for pid in reversed(pids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            child.wait()
        for directory in self.cgroups:
            if (directory / "freezer.state").exists():
                (directory / "freezer.state").write_text("THAWED")
            wait_for(partial(is_empty, directory))
            directory.rmdir()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


# ---- without root ----


def test_mountinfo_is_parsed_for_v2_and_v1_controllers(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw shared:9 - cgroup cgroup rw,cpu,cpuacct\n"
        "37 31 0:34 /ctr /sys/fs/cgroup/free\\040zer rw - cgroup cgroup rw,freezer\n"
        "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    found = find_hierarchies(mountinfo)
    assert sorted(found) == ["cpu", "cpuacct", "freezer", "v2"]
    assert found["cpu"].mount == found["cpuacct"].mount == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert found["freezer"].mount == Path("/sys/fs/cgroup/free zer")
    assert found["freezer"].dir("/ctr/job") == Path("/sys/fs/cgroup/free zer/job")
    assert found["v2"].cgroup(Path("/sys/fs/cgroup/unified/a/b")) == "/a/b"


def test_no_freezer_mounted_is_refused(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("41 31 0:38 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")
    with pytest.raises(ActuatorError, match="freezer"):
        CgroupActuator(Journal(tmp_path), version="v1", mountinfo=mountinfo)
    with pytest.raises(ActuatorError, match="cgroup v2"):
        CgroupActuator(Journal(tmp_path), version="v2", mountinfo=mountinfo)


def test_undo_of_a_malformed_or_vanished_entry_is_harmless() -> None:
    assert "nothing to undo" in undo({})
    assert isinstance(undo({"freeze": "not a dict", "quota": 3}), str)
    gone = {"kind": "cgroup", "job": "x", "frozen": True,
            "freeze": {"version": "v2", "path": "/sys/fs/cgroup/no-such-cgroup-here"},
            "quota": {"version": "v1", "path": "/no/such/dir", "original": "-1"}}
    assert "is gone" in undo(gone)


# ---- with real cgroups ----


@pytest.mark.parametrize("version", VERSIONS)
def test_pause_freezes_and_run_thaws(rig: Rig, version: str) -> None:
    child = rig.spawn()
    actuator = actuator_for(rig.journal, version)
    job = rig.attach(actuator, rig.job(pid=child.pid))
    primary = created_dir(USED[version][0], job)
    assert job.cgroup == str(primary)
    where = memberships(Path(f"/proc/{child.pid}/cgroup"))
    for name in USED[version]:
        assert where[name] == HIERARCHIES[name].cgroup(created_dir(name, job))

    actuator.apply(job, pause("too hot"))
    assert is_frozen(version, primary)
    assert cpu_advance([child.pid]) < 0.02
    identity = identify(child.pid)
    assert identity is not None
    moved = {"created": {name: str(created_dir(name, job)) for name in USED[version]},
             "root": child.pid,
             "processes": [[child.pid, identity.started_at, {
                 name: str(HIERARCHIES[name].dir(OWN.get(name, "/")))
                 for name in USED[version]}]]}
    assert rig.journal.holds()[hold_key(job)] == {
        "kind": "cgroup", "job": job.id, "frozen": True, "quota": None,
        "freeze": {"version": version, "path": str(primary)}, "moved": moved}

    thawed = "0" if version == "v2" else "THAWED"
    (primary / ("cgroup.freeze" if version == "v2" else "freezer.state")).write_text(thawed)
    assert wait_for(lambda: not is_frozen(version, primary))
    actuator.apply(job, pause("too hot"))
    assert is_frozen(version, primary), "a hold undone by someone else is put back"

    actuator.apply(job, RUN)
    assert not is_frozen(version, primary)
    assert cpu_advance([child.pid]) > 0.05
    assert rig.journal.holds()[hold_key(job)] == {
        "kind": "cgroup", "job": job.id, "frozen": False, "quota": None, "freeze": None,
        "moved": moved}, "released, the process stays moved: the journal says where from"


@pytest.mark.parametrize("version", VERSIONS)
def test_children_forked_after_attach_are_frozen_too(rig: Rig, version: str) -> None:
    go = rig.tmp_path / "go"
    child = rig.spawn(FORKS_LATER, str(go))
    actuator = actuator_for(rig.journal, version)
    job = rig.attach(actuator, rig.job(pid=child.pid))
    go.touch()
    assert wait_for(lambda: len(tree_pids(child.pid)) == 3), "the child did not fork twice"
    pids = tree_pids(child.pid)

    actuator.apply(job, pause("too hot"))
    for pid in pids:
        for name in USED[version]:
            cgroup = HIERARCHIES[name].cgroup(created_dir(name, job))
            assert memberships(Path(f"/proc/{pid}/cgroup"))[name] == cgroup
    assert cpu_advance(pids) < 0.02

    actuator.apply(job, RUN)
    assert cpu_advance(pids) > 0.05


@pytest.mark.skipif(os.geteuid() != 0, reason="changing cgroups needs root")
@pytest.mark.skipif("cpu" not in HIERARCHIES and not v2_has_cpu(),
                    reason="no cpu controller: neither cgroup v1 cpu nor cpu in cgroup v2")
def test_slow_holds_a_busy_child_near_its_speed(rig: Rig) -> None:
    child = rig.spawn()
    actuator = CgroupActuator(rig.journal)
    job = rig.attach(actuator, rig.job(pid=child.pid))
    actuator.apply(job, slow(0.3, "warm"))
    start, begun = cpu_seconds([child.pid]), time.monotonic()
    while time.monotonic() - begun < 10.0:
        time.sleep(0.25)
        actuator.apply(job, slow(0.3, "warm"))
    share = (cpu_seconds([child.pid]) - start) / (time.monotonic() - begun)
    print(f"CPU share of the child slowed to 0.3: {share:.3f}")
    assert 0.20 <= share <= 0.35
    entry = rig.journal.holds()[hold_key(job)]
    assert entry["frozen"] is False
    assert entry["quota"]["original"] in ("-1", "max 100000")

    actuator.apply(job, RUN)
    quota = entry["quota"]
    file = "cpu.max" if quota["version"] == "v2" else "cpu.cfs_quota_us"
    assert (Path(quota["path"]) / file).read_text().strip() == quota["original"]
    released = rig.journal.holds()[hold_key(job)]
    assert (released["frozen"], released["freeze"], released["quota"]) == (False, None, None)


def test_a_slowed_jobs_usage_is_judged_over_several_periods_and_never_across_holds(
        rig: Rig) -> None:
    """A job with more threads than its quota's cores spends each period's quota in a
    burst, so one period's usage reads 0 to twice the quota: the feedback waits for
    FEEDBACK_PERIODS of them, and starts its window again when the hold changes."""
    child = rig.spawn()
    actuator = CgroupActuator(rig.journal)
    job = rig.attach(actuator, rig.job(pid=child.pid))
    window = FEEDBACK_PERIODS * actuator.period_us / 1e6

    def rounds(directive: object, seconds: float) -> list[float]:
        """Apply it every 0.1 s, as the loop's rounds would; when a usage was judged."""
        judged, began = [], time.monotonic()
        while (now := time.monotonic()) - began < seconds:
            actuator.apply(job, directive)  # type: ignore[arg-type]
            if job.extra[EXTRA_KEY].slow_rate is not None:
                judged.append(now)
            time.sleep(0.1)
        return judged

    rounds(RUN, 0.5)
    assert job.extra[EXTRA_KEY].demand > 0.0, "a job running free has its demand learnt"
    began = time.monotonic()
    judged = rounds(slow(0.5, "warm"), 2.2)
    assert len(judged) >= 2
    assert judged[0] - began >= window - 0.01
    assert all(b - a >= window - 0.01 for a, b in itertools.pairwise(judged))
    changed = time.monotonic()
    judged = rounds(slow(0.3, "warm"), 1.2)
    assert judged and judged[0] - changed >= window - 0.01, "a new speed starts a new window"
    actuator.apply(job, RUN)


@pytest.mark.skipif(os.geteuid() != 0 or "v2" not in HIERARCHIES or v2_has_cpu(),
                    reason="needs root and a cgroup v2 without the cpu controller")
def test_slow_without_a_quota_pauses_and_warns_once(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    child = rig.spawn()
    actuator = CgroupActuator(rig.journal, version="v2")
    job = rig.attach(actuator, rig.job(pid=child.pid))
    with caplog.at_level(logging.WARNING, logger="governor.actuators.cgroup"):
        actuator.apply(job, slow(0.5, "warm"))
        actuator.apply(job, slow(0.5, "warm"))
    assert is_frozen("v2", created_dir("v2", job))
    assert len([r for r in caplog.records if "paused instead of slowed" in r.message]) == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_detach_returns_every_process_and_removes_the_cgroups(rig: Rig, version: str) -> None:
    label = uuid.uuid4().hex[:8]
    origins = {name: rig.cgroup(name, label) for name in USED[version]}
    go = rig.tmp_path / "go"
    child = rig.spawn(FORKS_LATER, str(go))
    for directory in origins.values():
        (directory / "cgroup.procs").write_text(str(child.pid))
    actuator = actuator_for(rig.journal, version)
    job = rig.attach(actuator, rig.job(pid=child.pid))
    go.touch()
    assert wait_for(lambda: len(tree_pids(child.pid)) == 3), "the child did not fork twice"
    actuator.apply(job, pause("too hot"))

    actuator.detach(job)
    for pid in tree_pids(child.pid):
        where = memberships(Path(f"/proc/{pid}/cgroup"))
        for name, directory in origins.items():
            assert where[name] == HIERARCHIES[name].cgroup(directory)
    for name in USED[version]:
        assert not created_dir(name, job).exists()
    assert hold_key(job) not in rig.journal.holds()
    assert cpu_advance(tree_pids(child.pid)) > 0.05


@pytest.mark.parametrize("version", VERSIONS)
def test_a_process_whose_cgroup_is_gone_stays_where_it_is(
        rig: Rig, version: str, caplog: pytest.LogCaptureFixture) -> None:
    """Never into the governor's own cgroup or its parent (a service's KillMode would
    kill it there, and it would live under the governor's limits): a process whose
    original cgroup was removed while it was held stays in governor-<id>, and the log
    says why."""
    label = uuid.uuid4().hex[:8]
    origins = {name: HIERARCHIES[name].dir(f"/test-gone-{label}") for name in USED[version]}
    child = rig.spawn()
    for directory in origins.values():
        directory.mkdir()
        (directory / "cgroup.procs").write_text(str(child.pid))
    actuator = actuator_for(rig.journal, version)
    job = rig.attach(actuator, rig.job(pid=child.pid))
    for directory in origins.values():
        directory.rmdir()  # emptied by the move; its owner (a Slurm job, a pod) ended
    try:
        with caplog.at_level(logging.WARNING, logger="governor.actuators.cgroup"):
            actuator.detach(job)
        rig.attached.clear()
        where = memberships(Path(f"/proc/{child.pid}/cgroup"))
        for name, directory in origins.items():
            assert where[name] == HIERARCHIES[name].cgroup(created_dir(name, job))
            assert f"its original cgroup {directory} is gone" in caplog.text
        assert hold_key(job) not in rig.journal.holds(), "nothing a later try could do"
    finally:
        for name in USED[version]:
            (HIERARCHIES[name].dir(OWN.get(name, "/")) / "cgroup.procs").write_text(
                str(child.pid))
            created_dir(name, job).rmdir()


@pytest.mark.parametrize(("version", "form"), [
    pytest.param("v2", "absolute", marks=needs("v2")),
    pytest.param("v1", "relative", marks=needs("freezer", "cpu")),
])
def test_a_cgroup_given_at_registration_is_held_and_left_in_place(
        rig: Rig, version: str, form: str) -> None:
    label = uuid.uuid4().hex[:8]
    dirs = [rig.cgroup(name, label) for name in USED[version]]
    child = rig.spawn()
    for directory in dirs:
        (directory / "cgroup.procs").write_text(str(child.pid))
    primary = dirs[0]
    given = str(primary) if form == "absolute" else HIERARCHIES[USED[version][0]].cgroup(primary)
    actuator = actuator_for(rig.journal, version)
    job = rig.attach(actuator, rig.job(cgroup=given))

    actuator.apply(job, pause("too hot"))
    assert is_frozen(version, primary)
    assert cpu_advance([child.pid]) < 0.02
    actuator.apply(job, RUN)
    assert not is_frozen(version, primary)

    actuator.detach(job)
    rig.attached.clear()
    assert primary.is_dir()
    assert str(child.pid) in (primary / "cgroup.procs").read_text().split()
    assert hold_key(job) not in rig.journal.holds()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing cgroups needs root")
@pytest.mark.skipif("cpu" not in HIERARCHIES and not v2_has_cpu(),
                    reason="no cpu controller: neither cgroup v1 cpu nor cpu in cgroup v2")
def test_undo_from_the_journal_alone_releases_a_job(rig: Rig) -> None:
    child = rig.spawn()
    actuator = CgroupActuator(rig.journal)
    job = rig.attach(actuator, rig.job(pid=child.pid))
    actuator.apply(job, slow(0.5, "warm"))
    actuator.apply(job, pause("too hot"))
    assert cpu_advance([child.pid]) < 0.02

    survivor = Journal(rig.journal.dir)  # what release-all reads after the daemon died
    assert survivor.load() == []
    entries = list(survivor.holds().values())
    assert len(entries) == 1
    entry = entries[0]
    assert entry["frozen"] is True
    assert entry["quota"] is not None

    first = undo(entry)
    assert "thawed" in first
    assert "restored the quota" in first
    assert "moved 1 process(es) back" in first
    where = memberships(Path(f"/proc/{child.pid}/cgroup"))
    for name, directory in entry["moved"]["created"].items():
        assert where[name] == OWN[name], "back in the cgroup it came from"
        assert not Path(directory).exists(), "the emptied cgroup is removed"
    assert cpu_advance([child.pid]) > 0.05
    second = undo(entry)
    assert "is gone" in second and "moved" not in second


@needs("v2" if "v2" in HIERARCHIES else "freezer")
def test_a_restarted_daemon_takes_over_its_cgroup_and_its_hold(rig: Rig) -> None:
    child = rig.spawn()
    first = CgroupActuator(rig.journal)
    job = rig.attach(first, rig.job(pid=child.pid))
    first.apply(job, pause("too hot"))
    primary = Path(str(job.cgroup))
    version = rig.journal.holds()[hold_key(job)]["freeze"]["version"]

    restarted = CgroupActuator(rig.journal)
    again = replace(job, extra={})
    rig.attach(restarted, again)
    assert again.cgroup == str(primary)
    assert is_frozen(version, primary)
    restarted.apply(again, RUN)
    assert not is_frozen(version, primary)
    assert rig.journal.holds()[hold_key(job)]["freeze"] is None
    rig.attached.remove((first, job))
    restarted.detach(again)
    assert not primary.exists()
    assert hold_key(job) not in rig.journal.holds()


@needs("v2" if "v2" in HIERARCHIES else "freezer")
def test_attach_refuses_an_exited_process_and_a_missing_cgroup(rig: Rig) -> None:
    actuator = CgroupActuator(rig.journal)
    child = subprocess.Popen(["sleep", "30"])
    job = rig.job(pid=child.pid)
    child.kill()
    child.wait()
    with pytest.raises(ActuatorError, match=f"process {child.pid} has exited"):
        actuator.attach(job)
    missing = f"/governor-test-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ActuatorError, match="no cgroup at"):
        actuator.attach(rig.job(cgroup=missing))
    with pytest.raises(ActuatorError, match="neither"):
        actuator.attach(rig.job())
