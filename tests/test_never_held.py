"""Slurm's step daemon is never stopped or frozen, but it is told by what cannot be
forged: its executable and uid. A user's process that merely calls itself `slurmstepd`
(a copy of sleep under that name, run as `nobody`) is held like any other, in signal
mode and in cgroup mode. The real slurmstepd is tested against real Slurm
(tests/test_slurm.py: a cgroup holding it is refused)."""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from governor.actuators.cgroup import CgroupActuator
from governor.actuators.signal import SignalActuator
from governor.host import procfs
from governor.host.cgroupfs import find_hierarchies, memberships
from governor.jobs.model import RUN, Job, Mode, pause
from governor.safety.journal import Journal
from tests.support.processes import in_a_root_of_its_own

NOBODY = 65534
FREEZER = find_hierarchies().get("freezer")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroups and another user need root"),
    pytest.mark.skipif(FREEZER is None, reason="no cgroup v1 freezer is mounted"),
]


def state_of(pid: int) -> bytes:
    return procfs.state(pid)


def wait_until(check: object, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(check) and check():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def impostor() -> Iterator[tuple[Path, int]]:
    """A cgroup of the test's own in the freezer holding one process of `nobody`'s, a
    copy of sleep named slurmstepd (its comm says so)."""
    assert FREEZER is not None
    own = memberships(Path("/proc/self/cgroup")).get("freezer", "/")
    directory = FREEZER.dir(posixpath.join(posixpath.dirname(own),
                                           f"governor-test-{uuid.uuid4().hex[:8]}"))
    directory.mkdir()
    bindir = Path(tempfile.mkdtemp(prefix="governor-stepd-"))
    bindir.chmod(0o755)
    fake = bindir / "slurmstepd"
    shutil.copy("/bin/sleep", fake)
    fake.chmod(0o755)
    child = subprocess.Popen([str(fake), "1000"], user=NOBODY)
    try:
        (directory / "cgroup.procs").write_text(str(child.pid))
        assert procfs.command(child.pid) == "slurmstepd"
        yield directory, child.pid
    finally:
        with contextlib.suppress(OSError):
            (directory / "freezer.state").write_text("THAWED")
        child.kill()
        child.wait()
        wait_until(lambda: not (directory / "cgroup.procs").read_text().strip())
        directory.rmdir()
        shutil.rmtree(bindir, ignore_errors=True)


def job_for(cgroup: Path, mode: Mode) -> Job:
    return Job(id=uuid.uuid4().hex[:12], name="impostor", mode=mode, pid=None,
               pid_started_at=None, cgroup=str(cgroup), devices=(), priority=0,
               registered_at=time.time())


def test_a_process_named_slurmstepd_is_not_slurms_step_daemon(
        impostor: tuple[Path, int]) -> None:
    _, pid = impostor
    assert not procfs.is_slurmstepd(pid)
    assert not procfs.is_slurmstepd(os.getpid())


def test_signal_mode_stops_a_process_that_calls_itself_slurmstepd(
        impostor: tuple[Path, int], tmp_path: Path) -> None:
    directory, pid = impostor
    actuator = SignalActuator(Journal(tmp_path / "state"))
    job = job_for(directory, Mode.SIGNAL)
    try:
        actuator.attach(job)
        actuator.apply(job, pause("hot"))
        assert wait_until(lambda: state_of(pid) in (b"T", b"t")), "the impostor is stopped"
        actuator.apply(job, RUN)
        assert wait_until(lambda: state_of(pid) not in (b"T", b"t"))
    finally:
        actuator.detach(job)
        actuator.close()


def test_cgroup_mode_accepts_a_job_with_a_process_that_calls_itself_slurmstepd(
        impostor: tuple[Path, int], tmp_path: Path) -> None:
    directory, _ = impostor
    actuator = CgroupActuator(Journal(tmp_path / "state"), version="v1")
    job = job_for(directory, Mode.CGROUP)
    try:
        actuator.attach(job)  # refused before: "holds pid N, which is ... slurmstepd"
        actuator.apply(job, pause("hot"))
        assert (directory / "freezer.state").read_text().strip() == "FROZEN"
        actuator.apply(job, RUN)
        assert (directory / "freezer.state").read_text().strip() == "THAWED"
    finally:
        actuator.detach(job)


def test_root_in_a_container_running_a_file_named_slurmstepd_is_not_slurms(
        tmp_path: Path) -> None:
    """Root in a container (here a chroot) runs a copy of sleep it named slurmstepd: uid
    0 and the executable's name both say slurmstepd, but its root directory is not the
    host's, so it is held like any other process."""
    sleep = shutil.which("sleep")
    assert sleep is not None
    shutil.copy(sleep, tmp_path / "slurmstepd")
    contained = in_a_root_of_its_own(tmp_path / "slurmstepd", tmp_path / "root", "600")
    try:
        deadline = time.monotonic() + 10
        while procfs.command(contained.pid) != "slurmstepd" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert procfs.command(contained.pid) == "slurmstepd"
        assert not procfs.is_slurmstepd(contained.pid)
    finally:
        contained.kill()
        contained.wait()
