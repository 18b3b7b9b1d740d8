"""The signal actuator against real processes receiving real signals.

CPU shares are behaviour windows, wide because the machine's cores are shared; how close
the duty cycle gets is for bench/ to measure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from governor.actuators.base import ActuatorError, hold_key
from governor.actuators.signal import SignalActuator, undo
from governor.jobs.model import RUN, Job, Mode, pause, slow
from governor.jobs.process import identify
from governor.safety.journal import Journal
from tests.support.paced_job import paced_job
from tests.support.processes import favour

BUSY = [sys.executable, "-c", "while True: pass"]
#: a shell that forks two busy children only after it has been attached
FORKS_LATER = ["sh", "-c", "sleep 0.3; (while :; do :; done) & (while :; do :; done) & wait"]

Spawn = Callable[[list[str]], "subprocess.Popen[bytes]"]


def state_of(pid: int) -> str:
    """The state letter in /proc/PID/stat (R, S, T...), or "" once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return ""
    return stat[stat.rindex(b")") + 2:][:1].decode()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def tree_pids(pid: int) -> list[int]:
    return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]


def all_stopped(pids: list[int]) -> bool:
    return all(state_of(pid) == "T" for pid in pids)


def none_stopped(pids: list[int]) -> bool:
    return all(state_of(pid) not in ("T", "") for pid in pids)


def tree_cpu(pid: int) -> float:
    total = 0.0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def cpu_rate(pid: int, seconds: float) -> float:
    """Cores the tree used over the next `seconds`."""
    cpu, start = tree_cpu(pid), time.monotonic()
    time.sleep(seconds)
    return (tree_cpu(pid) - cpu) / (time.monotonic() - start)


def job_for(pid: int | None, job_id: str = "j1", cgroup: str | None = None) -> Job:
    # governor's own reading (its boot time read once), as registration takes it: psutil
    # reads the boot time afresh each call, and it moves when the wall clock is adjusted
    found = identify(pid) if pid is not None else None
    started = found.started_at if found is not None else None
    return Job(id=job_id, name=job_id, mode=Mode.SIGNAL, pid=pid, pid_started_at=started,
               cgroup=cgroup, devices=(), priority=0, registered_at=time.time())


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Starts processes, each in a session of its own, and kills their whole groups after."""
    started: list[subprocess.Popen[bytes]] = []

    def start(args: list[str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(args, start_new_session=True, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.returncode is None:  # once reaped, its pid may be someone else's
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "state")


@pytest.fixture
def actuator(journal: Journal) -> Iterator[SignalActuator]:
    actuator = SignalActuator(journal)
    try:
        yield actuator
    finally:
        actuator.close()


def started_later(spawn: Spawn, actuator: SignalActuator) -> tuple[Job, list[int]]:
    """A job attached before its two children exist; returns it once they run."""
    shell = spawn(FORKS_LATER)
    job = job_for(shell.pid)
    actuator.attach(job)

    def forked() -> bool:
        children = psutil.Process(shell.pid).children()
        return len(children) == 2 and all(c.name() != "sleep" for c in children)

    assert wait_until(forked)
    return job, tree_pids(shell.pid)


def test_pause_stops_the_process_and_run_continues_it(
        spawn: Spawn, actuator: SignalActuator, journal: Journal) -> None:
    child = spawn(BUSY)
    job = job_for(child.pid)
    actuator.attach(job)

    actuator.apply(job, pause("hot"))
    assert wait_until(lambda: state_of(child.pid) == "T")
    on_disk = Journal(journal.dir)
    on_disk.load()
    assert on_disk.holds()[hold_key(job)] == {
        "kind": "signal", "job": "j1", "state": "stopped",
        "processes": [[child.pid, job.pid_started_at]]}

    actuator.apply(job, pause("hot"))
    assert state_of(child.pid) == "T"

    actuator.apply(job, RUN)
    assert wait_until(lambda: state_of(child.pid) not in ("T", ""))
    assert journal.holds() == {}


def test_pause_holds_children_forked_after_attach(
        spawn: Spawn, actuator: SignalActuator, journal: Journal) -> None:
    job, pids = started_later(spawn, actuator)

    actuator.apply(job, pause("hot"))
    assert wait_until(lambda: all_stopped(pids))
    listed = {pid for pid, _ in journal.holds()[hold_key(job)]["processes"]}
    assert listed == set(pids)

    actuator.apply(job, RUN)
    assert wait_until(lambda: none_stopped(pids))


def test_pause_stops_again_a_process_someone_else_continued(
        spawn: Spawn, actuator: SignalActuator) -> None:
    job, pids = started_later(spawn, actuator)
    actuator.apply(job, pause("hot"))
    assert wait_until(lambda: all_stopped(pids))

    os.kill(pids[-1], signal.SIGCONT)
    assert wait_until(lambda: state_of(pids[-1]) == "R")
    actuator.apply(job, pause("hot"))
    assert wait_until(lambda: all_stopped(pids))


def test_slow_keeps_a_busy_process_near_its_speed(
        spawn: Spawn, actuator: SignalActuator) -> None:
    child = spawn(BUSY)
    favour([child.pid])
    job = job_for(child.pid)
    actuator.attach(job)

    actuator.apply(job, slow(0.3, "warm"))
    share = cpu_rate(child.pid, 10.0)
    print(f"slow 0.3, one busy process: {share:.3f} of a core")
    assert 0.20 <= share <= 0.35


def test_slow_gives_a_two_process_job_its_share_and_no_more(
        spawn: Spawn, actuator: SignalActuator) -> None:
    shell = spawn(["sh", "-c", "while :; do :; done & while :; do :; done"])
    assert wait_until(lambda: len(psutil.Process(shell.pid).children()) == 1)
    favour(tree_pids(shell.pid))
    job = job_for(shell.pid)
    actuator.attach(job)

    before = cpu_rate(shell.pid, 2.0)
    actuator.apply(job, slow(0.5, "warm"))
    slowed = cpu_rate(shell.pid, 6.0)
    actuator.apply(job, RUN)
    after = cpu_rate(shell.pid, 2.0)  # the other load changes: measure free on both sides
    free = (before + after) / 2
    print(f"slow 0.5, two busy processes: {before:.3f} and {after:.3f} cores free, "
          f"{slowed:.3f} slowed, ratio {slowed / free:.3f}")
    assert 0.35 <= slowed / free <= 0.65


def test_slow_gives_a_job_that_waits_its_share_of_what_it_does_free(
        spawn: Spawn, actuator: SignalActuator) -> None:
    """A job that uses a quarter of a core and sleeps the rest (as one feeding a GPU
    does) makes up for a stop as soon as it runs again; slowed to 0.5 after running free,
    it does half of what it did free, not the more that its rate while running says."""
    child = spawn([sys.executable, "-c", paced_job(0.25)])
    favour([child.pid])
    job = job_for(child.pid)
    actuator.attach(job)
    free = cpu_rate(child.pid, 2.0)
    actuator.apply(job, slow(0.5, "warm"))
    time.sleep(2.0)  # the duty cycle settles
    slowed = cpu_rate(child.pid, 8.0)
    print(f"slow 0.5, a job that waits: {free:.3f} cores free, {slowed:.3f} slowed, "
          f"ratio {slowed / free:.3f}")
    assert 0.35 <= slowed / free <= 0.62


class CountingJournal(Journal):
    """Counts the times the journal file is rewritten (each one an fsync)."""

    writes = 0

    def _write(self) -> None:
        self.writes += 1
        super()._write()


def test_slow_cycles_children_forked_later_without_rewriting_the_journal(
        spawn: Spawn, tmp_path: Path) -> None:
    journal = CountingJournal(tmp_path / "state")
    actuator = SignalActuator(journal)
    try:
        shell = spawn(FORKS_LATER)
        job = job_for(shell.pid)
        actuator.attach(job)
        actuator.apply(job, slow(0.5, "warm"))
        assert wait_until(lambda: len(psutil.Process(shell.pid).children()) == 2
                          and all(c.name() != "sleep"
                                  for c in psutil.Process(shell.pid).children()))
        pids = tree_pids(shell.pid)
        time.sleep(0.3)  # the next stop records the newcomers, once
        writes = journal.writes
        seen: dict[int, set[str]] = {pid: set() for pid in pids}
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for pid in pids:
                seen[pid].add(state_of(pid))
            time.sleep(0.005)
        assert all("T" in states and states - {"T", ""} for states in seen.values()), seen
        assert journal.writes == writes
        listed = {pid for pid, _ in journal.holds()[hold_key(job)]["processes"]}
        assert listed == set(pids)
    finally:
        actuator.close()


def test_leaving_slow_ends_the_cycle_in_the_asked_state(
        spawn: Spawn, actuator: SignalActuator, journal: Journal) -> None:
    job, pids = started_later(spawn, actuator)
    actuator.apply(job, slow(0.3, "warm"))
    assert journal.holds()[hold_key(job)]["state"] == "slowed"
    time.sleep(0.35)
    actuator.apply(job, slow(0.6, "warmer"))
    time.sleep(0.35)

    actuator.apply(job, pause("hot"))
    assert journal.holds()[hold_key(job)]["state"] == "stopped"
    assert wait_until(lambda: all_stopped(pids))
    for _ in range(6):
        time.sleep(0.05)
        assert all_stopped(pids)

    actuator.apply(job, slow(0.3, "warm"))
    time.sleep(0.3)
    actuator.apply(job, RUN)
    for _ in range(6):
        assert none_stopped(pids)
        time.sleep(0.05)
    assert journal.holds() == {}


def test_a_reused_pid_is_never_signalled(spawn: Spawn, actuator: SignalActuator) -> None:
    if os.geteuid() != 0:
        pytest.skip("forcing a pid's reuse through ns_last_pid needs root")
    victim = spawn(["sleep", "60"])
    job = job_for(victim.pid)
    actuator.attach(job)
    victim.kill()
    victim.wait()
    # start times have clock-tick resolution: a newcomer in the same tick would look alike
    time.sleep(0.05)

    newcomer = None
    for _ in range(20):
        try:
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(victim.pid - 1))
        except OSError as exc:
            pytest.skip(f"cannot write ns_last_pid: {exc}")
        candidate = spawn(["sleep", "60"])
        if candidate.pid == victim.pid:
            newcomer = candidate
            break
        candidate.kill()
        candidate.wait()
    if newcomer is None:
        pytest.skip(f"pid {victim.pid} went to other processes on every try")

    actuator.apply(job, pause("hot"))
    actuator.apply(job, slow(0.3, "warm"))
    actuator.apply(job, pause("hot"))
    for _ in range(5):
        assert state_of(newcomer.pid) not in ("T", "")
        time.sleep(0.05)


def test_close_while_slowing_leaves_the_job_running(
        spawn: Spawn, actuator: SignalActuator, journal: Journal) -> None:
    job, pids = started_later(spawn, actuator)
    for delay in (0.23, 0.31, 0.47):  # land in different phases of the cycle
        actuator.apply(job, slow(0.3, "warm"))
        time.sleep(delay)
        actuator.close()
        for _ in range(6):
            assert none_stopped(pids)
            time.sleep(0.05)
        assert journal.holds() == {}


def test_undo_continues_a_paused_tree_from_its_journal_entry(
        spawn: Spawn, actuator: SignalActuator, journal: Journal) -> None:
    job, pids = started_later(spawn, actuator)
    actuator.apply(job, pause("hot"))
    assert wait_until(lambda: all_stopped(pids))
    on_disk = Journal(journal.dir)
    on_disk.load()
    entry = on_disk.holds()[hold_key(job)]

    first = undo(entry)
    assert "continued 3 processes" in first
    assert wait_until(lambda: none_stopped(pids))
    second = undo(entry)
    assert isinstance(second, str)
    assert none_stopped(pids)


@pytest.mark.parametrize("how", ["pause, then run", "slow, then run",
                                 "pause, then undo from the journal"])
def test_a_release_leaves_a_process_its_user_stopped_stopped(
        how: str, spawn: Spawn, actuator: SignalActuator, journal: Journal) -> None:
    """A process of the job that its user stopped (ctrl-Z, kill -STOP) or a debugger holds
    stays stopped when governor releases the job, here or through the journal (the
    guardian, release-all): governor continues only what it stopped."""
    shell = spawn(["sh", "-c", "sleep 600 & sleep 600 & wait"])
    assert wait_until(lambda: len(psutil.Process(shell.pid).children()) == 2)
    pids = tree_pids(shell.pid)
    users, others = pids[-1], pids[:-1]
    os.kill(users, signal.SIGSTOP)
    assert wait_until(lambda: state_of(users) == "T")
    job = job_for(shell.pid)
    actuator.attach(job)

    if how.startswith("slow"):
        actuator.apply(job, slow(0.3, "warm"))
        time.sleep(0.5)  # a few duty cycles
    else:
        actuator.apply(job, pause("hot"))
        assert all_stopped(pids)
    listed = {pid for pid, _ in journal.holds()[hold_key(job)]["processes"]}
    assert users not in listed and set(others) <= listed, "the journal lists only its own"
    if how.endswith("undo from the journal"):
        on_disk = Journal(journal.dir)
        on_disk.load()
        assert "continued 2 processes" in undo(on_disk.holds()[hold_key(job)])
    else:
        actuator.apply(job, RUN)
    assert wait_until(lambda: none_stopped(others))
    for _ in range(5):
        assert state_of(users) == "T", "the process its user stopped is still stopped"
        time.sleep(0.05)


def test_undo_skips_what_is_gone_and_never_raises(spawn: Spawn) -> None:
    gone = spawn(["true"])
    gone.wait()
    assert "1 listed ones gone" in undo(
        {"kind": "signal", "job": "j1", "processes": [[gone.pid, 1.0]]})
    for malformed in ({}, {"processes": "nonsense"}, {"processes": [[1]]}, {"processes": None}):
        assert isinstance(undo(malformed), str)


def test_attach_refuses_what_it_cannot_hold(spawn: Spawn, actuator: SignalActuator) -> None:
    child = spawn(["sleep", "60"])
    impostor = job_for(child.pid)
    impostor.pid_started_at = (impostor.pid_started_at or 0.0) - 100.0
    with pytest.raises(ActuatorError, match=f"pid {child.pid} is now another process"):
        actuator.attach(impostor)

    done = spawn(["true"])
    done.wait()
    with pytest.raises(ActuatorError, match=f"process {done.pid} has exited"):
        actuator.attach(Job(id="dead", name="dead", mode=Mode.SIGNAL, pid=done.pid,
                            pid_started_at=1.0, cgroup=None, devices=(), priority=0,
                            registered_at=0.0))

    with pytest.raises(ActuatorError):
        actuator.attach(job_for(None, "nothing"))
    with pytest.raises(ActuatorError):
        actuator.attach(job_for(os.getpid(), "me"))


def test_detach_continues_the_job(
        spawn: Spawn, actuator: SignalActuator, journal: Journal) -> None:
    child = spawn(BUSY)
    job = job_for(child.pid)
    actuator.attach(job)
    actuator.apply(job, pause("hot"))
    assert wait_until(lambda: state_of(child.pid) == "T")

    actuator.detach(job)
    assert state_of(child.pid) not in ("T", "")
    assert journal.holds() == {}
    actuator.detach(job)


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, fs = line.partition(" - ")
        if fs.startswith("cgroup2 "):
            return Path(fields.split()[4])
    return None


def test_a_job_named_by_cgroup_holds_its_processes(
        spawn: Spawn, actuator: SignalActuator) -> None:
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 file system is mounted")
    group = mount / f"governor-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup: {exc}")
    child = spawn(BUSY)
    try:
        try:
            (group / "cgroup.procs").write_text(str(child.pid))
        except OSError as exc:
            pytest.skip(f"cannot move a process into a cgroup: {exc}")
        job = job_for(None, cgroup=f"/{group.name}")
        actuator.attach(job)
        actuator.apply(job, pause("hot"))
        assert wait_until(lambda: state_of(child.pid) == "T")
        actuator.apply(job, RUN)
        assert state_of(child.pid) not in ("T", "")
    finally:
        child.kill()
        child.wait()
        wait_until(lambda: not (group / "cgroup.procs").read_text().strip())
        group.rmdir()


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def refused_as_nobody(pid: int, state_dir: str) -> dict[str, Any]:
    """In a forked child that became user nobody: pause a process it may not signal."""
    os.setgid(65534)
    os.setuid(65534)
    collect = Collect()
    logging.getLogger("governor.actuators.signal").addHandler(collect)
    actuator = SignalActuator(Journal(state_dir))
    job = job_for(pid)
    actuator.attach(job)
    try:
        actuator.apply(job, pause("hot"))
        error = None
    except ActuatorError as exc:
        error = str(exc)
    actuator.close()
    return {"error": error, "logs": collect.lines}


def test_a_process_it_may_not_signal_is_refused_clearly(spawn: Spawn) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the actuator as another user")
    child = spawn(BUSY)
    state_dir = tempfile.mkdtemp(prefix="governor-test-")
    os.chmod(state_dir, 0o777)
    try:
        read_end, write_end = os.pipe()
        forked = os.fork()
        if forked == 0:  # pragma: no cover - the child reports through the pipe
            status = 1
            try:
                os.close(read_end)
                os.write(write_end, json.dumps(refused_as_nobody(child.pid, state_dir)).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read()
        assert os.waitpid(forked, 0)[1] == 0
        result = json.loads(answer)
        assert result["error"] == "not allowed to stop the processes of job j1"
        assert any(f"not allowed to signal pid {child.pid}" in line for line in result["logs"])
        assert state_of(child.pid) != "T"
        journal = Journal(state_dir)
        journal.load()
        assert journal.holds() == {}
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
