"""Reading what Slurm says: `scontrol show job -d`, host lists, slurm.conf and the spool.

These are the parsers the Slurm job source and the suspend mode use; the real Slurm
tests (test_slurm.py) run them against scontrol itself. What the real cluster cannot be
made to do on cue (hang on one call, fail for one job) is a stand-in scontrol on PATH
(tests/support/fake_scontrol.py), against the job source's worker."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from governor.config import SlurmConfig
from governor.host import slurm
from governor.jobs.sources import slurm as source
from governor.jobs.sources.base import Changes
from tests.support.fake_scontrol import FakeScontrol

T = TypeVar("T")

FIXTURES = Path(__file__).parent / "fixtures" / "slurm"


def test_show_job_gives_name_owner_qos_partition_and_gpus_per_node() -> None:
    job = slurm.parse_show_job((FIXTURES / "show_job_two_nodes.txt").read_text())
    assert job is not None
    assert (job.job_id, job.name, job.user, job.uid) == ("2", "train resnet (sweep 4)",
                                                         "alice", 1001)
    assert (job.qos, job.partition, job.state) == ("high", "gpu", "RUNNING")
    assert job.gpus == {"gpu07": (1,), "gpu08": (1,), "cpu1": ()}


def test_unset_qos_is_empty_and_several_gpus_expand() -> None:
    text = ("JobId=7 JobName=x\n   UserId=root(0) GroupId=root(0)\n"
            "   Priority=1 Nice=0 Account=(null) QOS=(null)\n"
            "   JobState=SUSPENDED Reason=None\n   Partition=debug AllocNode:Sid=h:1\n"
            "     Nodes=node1 CPU_IDs=0-1 Mem=0 GRES=gpu:4(IDX:0-1,3)\n")
    job = slurm.parse_show_job(text)
    assert job is not None
    assert (job.qos, job.state, job.gpus) == ("", "SUSPENDED", {"node1": (0, 1, 3)})
    assert slurm.parse_show_job("slurm_load_jobs error: Invalid job id specified") is None


def test_host_lists_expand_as_slurm_does() -> None:
    assert slurm.expand_hostlist("node[1-3,7],gpu01") == ["node1", "node2", "node3",
                                                          "node7", "gpu01"]
    assert slurm.expand_hostlist("n[01-02]x") == ["n01x", "n02x"]
    assert slurm.expand_ranges("0-2,5") == [0, 1, 2, 5]


def test_the_spool_of_each_slurmd_on_the_host_and_the_steps_in_it(tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"# a comment\nSlurmdSpoolDir={tmp_path}/spool/%n  # each node's\n"
                    "NodeName=a,b CPUs=2\n")
    for node in ("a", "b"):
        (tmp_path / "spool" / node).mkdir(parents=True)
    site = slurm.SlurmSite(str(conf))
    spools = slurm.spool_dirs(site)
    assert spools == [f"{tmp_path}/spool/a", f"{tmp_path}/spool/b"]
    for name in ("a_12.4294967291", "a_12.0", "b_12.0", "b_9.4294967291"):
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(tmp_path / "spool" / name[0] / name))
    (tmp_path / "spool" / "a" / "job00012").mkdir()
    (tmp_path / "spool" / "a" / "hwloc_topo_12.4294967291.xml").write_text("")
    steps = slurm.running_steps(spools)
    assert {(s.node, s.job_id, s.step_id) for s in steps} == {
        ("a", "12", "4294967291"), ("a", "12", "0"), ("b", "12", "0"),
        ("b", "9", "4294967291")}
    assert slurm.running_steps([str(tmp_path / "nowhere")]) == frozenset()


def test_a_missing_conf_falls_back_to_slurms_default_spool(tmp_path: Path) -> None:
    site = slurm.SlurmSite(str(tmp_path / "absent.conf"))
    assert slurm.spool_dirs(site) == [slurm.DEFAULT_SPOOL]


def settled(found: source.SlurmSource, timeout: float = 20.0) -> Changes:
    """Poll until the worker has answered every job handed to it; the last poll's changes.
    (A job handed over stays in `_asking` until a poll takes its answer.)"""
    deadline = time.monotonic() + timeout
    changes = found.poll()
    while found._asking:
        assert time.monotonic() < deadline, f"scontrol did not answer within {timeout} s"
        time.sleep(0.02)
        changes = found.poll()
    return changes


def test_a_stale_step_socket_is_asked_for_with_back_off_not_every_poll(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket left by a slurmstepd killed -9 stays in the spool, and scontrol fails for
    its job: discovery asks again after 1 s, 2 s, 4 s..., not at every round."""
    fake = FakeScontrol(tmp_path / "scontrol", monkeypatch)
    fake.fail("Unable to connect to slurmstepd: Connection refused")
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "node1_7.4294967291").touch()
    now = [100.0]
    found = source.SlurmSource(SlurmConfig(discover=True), site=slurm.SlurmSite(),
                               clock=lambda: now[0])
    found._spools = [str(spool)]
    try:
        problem = ("Slurm job 7: Unable to connect to slurmstepd: Connection refused",)
        assert settled(found).problems == problem
        asked = ["show job -d 7"]
        for _ in range(5):  # five rounds within the first second: no scontrol, same problem
            now[0] += 0.1
            assert found.poll().problems == problem
            assert not found._asking
        assert fake.calls() == asked
        now[0] += 0.6
        assert settled(found).problems == problem
        assert fake.calls() == asked * 2
        now[0] += 1.5  # the next try is 2 s after the last
        found.poll()
        assert not found._asking
        now[0] += 0.6
        settled(found)
        assert fake.calls() == asked * 3
        (spool / "node1_7.4294967291").unlink()
        now[0] += 100
        assert not found.poll().problems
        assert not found._asking
        assert fake.calls() == asked * 3
    finally:
        found.close()


def test_a_poll_returns_while_scontrol_hangs_and_the_job_arrives_once_it_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Discovery asks Slurm on a worker of its own: while scontrol hangs on a new job, a
    poll returns at once without it, and still reports a job that ended; the new job is
    in the first poll after scontrol answers."""
    fake = FakeScontrol(tmp_path / "scontrol", monkeypatch)
    spool = tmp_path / "spool"
    spool.mkdir()
    job = subprocess.Popen(["sleep", "1000"])
    found = source.SlurmSource(SlurmConfig(discover=True), site=slurm.SlurmSite())
    found._spools = [str(spool)]
    try:
        for job_id, name in (("5", "older"), ("7", "newer")):
            fake.job(job_id, name=name)
            fake.pids(job_id, [job.pid])
        (spool / "node1_5.0").touch()
        (older,) = wait_for(lambda: found.poll().started, 20.0, "job 5")
        assert older.scheduler_id == "5"

        fake.hang()
        (spool / "node1_7.0").touch()
        first = found.poll()
        assert not first.started and not first.problems
        hung = wait_for(fake.running, 10.0, "scontrol called for job 7")
        (spool / "node1_5.0").unlink()
        again = found.poll()
        assert fake.running() == hung, "polled while that scontrol still hangs"
        assert (again.started, again.ended, again.problems) == ((), ("5",), ())

        fake.answer()
        arrived = wait_for(lambda: found.poll().started, 20.0, "job 7 once scontrol answers")
        assert [(r.scheduler_id, r.name, r.pid, r.user, r.source) for r in arrived] == [
            ("7", "newer", job.pid, "nobody", "slurm")]
        assert fake.calls() == ["show job -d 5", "listpids 5 node1",
                                "show job -d 7", "listpids 7 node1"]
        assert not found.poll()
    finally:
        found.close()
        job.kill()
        job.wait()
    assert not [t for t in threading.enumerate() if t.name == "slurm-discovery"], \
        "close() stops the worker"


def wait_for(check: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)
    return value
