"""Slurm jobs governed against a real Slurm: munged, slurmctld and two slurmd on localhost
(tests/support/slurm_cluster.py), the daemon discovering jobs in slurmd's spool, holding
them with `scontrol suspend` or signals, and the guardian resuming what it suspended.

GPUs are GRES on each node, and the daemon's NVML is the fake one with two GPUs, so "GPU
0 of node1" is both what Slurm allocated and what the daemon samples. One cluster serves
the whole module; each test cancels its jobs.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from governor.safety.journal import Journal
from tests.support.c_nvml import CNvmlState
from tests.support.daemon import REPO, DaemonProcess, wait_for
from tests.support.fake_nvml import h100
from tests.support.slurm_cluster import SlurmCluster, slurm_missing
from tests.support.unix_http import NOBODY, open_to_others, unix_request

pytestmark = pytest.mark.skipif(slurm_missing() is not None,
                                reason=str(slurm_missing()))

Start = Callable[..., DaemonProcess]
SPIN = "python3 -c 'while True: pass'"


PROLOG = REPO / "deploy" / "slurm" / "task_prolog.sh"
EPILOG = REPO / "deploy" / "slurm" / "task_epilog.sh"


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    """Two nodes, each with two GPUs, and the task prolog and epilog installed. For most
    tests they find no `governor` and let the job run, as on a node without one; the
    prolog's test gives its job the command and config (a job's environment is its task
    prolog's). Its directory is open to other users (pytest's is root's alone): slurmd
    runs the jobs of `nobody` from its spool there."""
    workdir = Path(tempfile.mkdtemp(prefix="governor-slurm-"))
    workdir.chmod(0o755)
    try:
        with SlurmCluster(workdir, ("node1", "node2"), task_prolog=PROLOG,
                          task_epilog=EPILOG) as running:
            yield running
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def slurm(cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The module's cluster, with every job this test submitted cancelled afterwards."""
    yield cluster
    for job in cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
        cluster.run("scontrol", "resume", job, check=False)
        cluster.run("scancel", "--full", job, check=False)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and cluster.run("squeue", "-h", check=False).stdout:
        time.sleep(0.2)


def cool() -> dict[str, Any]:
    return {"gpus": [h100(0, temperature=60), h100(1, temperature=60)]}


def config(slurm: SlurmCluster, **settings: Any) -> dict[str, Any]:
    rule = {"name": "gpu-hot", "metric": "gpu_temperature_celsius", "above": 85.0,
            "for": 0, "clear_below": 75.0, "action": "pause"}
    return {"daemon": {"interval": 0.25},
            "slurm": {"discover": True, "conf": str(slurm.conf), "nodes": ["node1"],
                      "partition_priority": {"urgent": 50}, "qos_priority": {},
                      "default_priority": 5, **settings},
            "rules": [rule]}


def heat_gpu_of(gpus: dict[str, Any], job: dict[str, Any], temperature: float = 95) -> None:
    """Make the GPU the job is bound to hot, in the state the caller then writes."""
    gpus["gpus"][int(job["devices"][0].removeprefix("gpu"))]["temperature"] = temperature


def slurm_jobs(d: DaemonProcess) -> dict[str, dict[str, Any]]:
    jobs = d.get("/v1/jobs").json()
    return {j["scheduler_id"]: j for j in jobs if j.get("source") == "slurm"}


def states(pids: list[int]) -> set[str]:
    found = set()
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        found.add(text.rsplit(")", 1)[1].split()[0])
    return found


def line_of(table: str, word: str) -> str:
    """The one line of a CLI table that names `word`."""
    (line,) = [row for row in table.splitlines() if word in row.split()]
    return line


def test_a_batch_job_becomes_a_governor_job_and_goes_when_it_ends(
        slurm: SlurmCluster, daemon: Start, c_nvml: CNvmlState) -> None:
    c_nvml.write(cool())
    d = daemon(config(slurm), c_nvml=c_nvml)
    slurm.sbatch("-w", "node1", "--gres=gpu:1", "-J", "first", wrap="sleep 1000")
    job_id = slurm.sbatch("-w", "node1", "--gres=gpu:1", "-p", "urgent",
                          "-J", "train resnet", wrap="sleep 1000")
    slurm.wait_state(job_id, "R")
    started = time.monotonic()
    job = wait_for(lambda: slurm_jobs(d).get(job_id), 2.0, "governor job", d)
    assert time.monotonic() - started < 2.0
    assert (job["name"], job["user"], job["priority"], job["devices"]) == (
        "train resnet", "root", 50, ["gpu1"])
    assert job["mode"] == "suspend" and job["cgroup"].endswith(f"/job_{job_id}")
    metrics = d.metrics()
    assert (f'governor_job_info{{id="{job["id"]}",job="train resnet",namespace="",pod="",'
            f'scheduler_id="{job_id}",source="slurm",user="root"}} 1.0') in metrics
    listed = d.cli("jobs").stdout
    assert job_id in listed and "slurm" in listed

    slurm.run("scancel", job_id)
    gone_at = time.monotonic()
    wait_for(lambda: job_id not in slurm_jobs(d), 2.0, "unregistration after scancel", d)
    assert time.monotonic() - gone_at < 2.0


def test_a_daemon_for_the_second_slurmd_of_a_host_finds_its_jobs_processes(
        slurm: SlurmCluster, daemon: Start, c_nvml: CNvmlState) -> None:
    """With several slurmd on one host, `scontrol listpids` without a node name asks the
    first node of slurm.conf: node2's daemon must name node2, or it never registers."""
    c_nvml.write(cool())
    d = daemon(config(slurm, nodes=["node2"]), c_nvml=c_nvml)
    on2 = slurm.sbatch("-w", "node2", "--gres=gpu:1", "-J", "on2", wrap="sleep 1000")
    on1 = slurm.sbatch("-w", "node1", "--gres=gpu:1", "-J", "on1", wrap="sleep 1000")
    slurm.wait_state(on2, "R")
    slurm.wait_state(on1, "R")
    job = wait_for(lambda: slurm_jobs(d).get(on2), 3.0, "node2's job registered", d)
    assert "/slurm_node2/" in job["cgroup"] and job["cgroup"].endswith(f"/job_{on2}")
    time.sleep(0.5)
    assert on1 not in slurm_jobs(d), "node1's job is not this daemon's"


def test_a_hot_gpu_suspends_the_job_on_it_and_only_that_one(
        slurm: SlurmCluster, daemon: Start, c_nvml: CNvmlState) -> None:
    gpus = cool()
    c_nvml.write(gpus)
    d = daemon(config(slurm), c_nvml=c_nvml)
    on0 = slurm.sbatch("-w", "node1", "--gres=gpu:1", "-J", "on0", wrap=SPIN)
    on1 = slurm.sbatch("-w", "node1", "--gres=gpu:1", "-J", "on1", wrap=SPIN)
    slurm.wait_state(on0, "R")
    slurm.wait_state(on1, "R")
    wait_for(lambda: len(slurm_jobs(d)) == 2, 3.0, "both jobs registered", d)
    hot = 0 if slurm_jobs(d)[on0]["devices"] == ["gpu0"] else 1
    gpus["gpus"][hot]["temperature"] = 95
    c_nvml.write(gpus)
    slurm.wait_state(on0, "S", timeout=5)
    assert slurm.state(on1) == "R"
    assert slurm_jobs(d)[on0]["state"] == "paused"
    assert "gpu-hot" in " ".join(slurm_jobs(d)[on0]["reasons"])

    gpus["gpus"][hot]["temperature"] = 60
    c_nvml.write(gpus)
    slurm.wait_state(on0, "R", timeout=5)
    assert slurm_jobs(d)[on0]["state"] == "running"
    assert states(slurm.pids(on0)) & {"R"}, "its processes run again"


def test_signal_hold_stops_this_nodes_processes_and_slurm_still_says_running(
        slurm: SlurmCluster, daemon: Start, c_nvml: CNvmlState) -> None:
    gpus = cool()
    c_nvml.write(gpus)
    d = daemon(config(slurm, hold="signal"), c_nvml=c_nvml)
    job_id = slurm.sbatch("-w", "node1", "--gres=gpu:1", "-J", "sig", wrap=SPIN)
    slurm.wait_state(job_id, "R")
    job = wait_for(lambda: slurm_jobs(d).get(job_id), 3.0, "governor job", d)
    assert job["mode"] == "signal"
    heat_gpu_of(gpus, job)
    c_nvml.write(gpus)
    wait_for(lambda: states(slurm.pids(job_id)) == {"T"}, 5.0, "every process stopped", d)
    assert slurm.state(job_id) == "R"
    gpus = cool()
    c_nvml.write(gpus)
    wait_for(lambda: "T" not in states(slurm.pids(job_id)), 5.0, "processes continued", d)


def test_kill_9_resumes_what_governor_suspended_and_not_what_an_admin_did(
        slurm: SlurmCluster, daemon: Start, c_nvml: CNvmlState) -> None:
    gpus = cool()
    c_nvml.write(gpus)
    d = daemon(config(slurm), c_nvml=c_nvml)
    ours = slurm.sbatch("-w", "node1", "--gres=gpu:1", "-J", "ours", wrap=SPIN)
    admins = slurm.sbatch("-w", "node1", "--gres=gpu:1", "-J", "admins", wrap=SPIN)
    slurm.wait_state(ours, "R")
    slurm.wait_state(admins, "R")
    wait_for(lambda: len(slurm_jobs(d)) == 2, 3.0, "both jobs registered", d)
    slurm.run("scontrol", "suspend", admins)
    slurm.wait_state(admins, "S")
    for gpu in gpus["gpus"]:
        gpu["temperature"] = 95
    c_nvml.write(gpus)
    slurm.wait_state(ours, "S", timeout=5)
    time.sleep(1)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    killed = time.monotonic()
    slurm.wait_state(ours, "R", timeout=2)
    assert time.monotonic() - killed < 2.0
    time.sleep(1)
    assert slurm.state(admins) == "S", "an administrator's suspend is not governor's to undo"


def test_an_administrators_resume_is_noticed_audited_shown_and_not_fought(
        slurm: SlurmCluster, daemon: Start, c_nvml: CNvmlState) -> None:
    """While the rule still holds, /v1/jobs, `governor jobs` and the metrics say the job
    runs, resumed outside governor; its directive stays the rule's pause. The flag goes
    when the rule clears, and the next pause is governor's again."""
    gpus = cool()
    c_nvml.write(gpus)
    d = daemon(config(slurm), c_nvml=c_nvml)
    job_id = slurm.sbatch("-w", "node1", "--gres=gpu:1", "-J", "fought", wrap=SPIN)
    slurm.wait_state(job_id, "R")
    job = wait_for(lambda: slurm_jobs(d).get(job_id), 3.0, "governor job", d)
    heat_gpu_of(gpus, job)
    c_nvml.write(gpus)
    slurm.wait_state(job_id, "S", timeout=5)
    wait_for(lambda: states(slurm.pids(job_id)) <= {"T", "D"}, 5.0, "suspended processes", d)
    d.wait_rounds(2)
    slurm.run("scontrol", "resume", job_id)

    def audited() -> list[dict[str, Any]]:
        events = d.get("/v1/events").json()["events"]
        return [e for e in events if e["what"] == "outside-resume"]
    event = wait_for(audited, 3.0, "an outside-resume audit event", d)[0]
    assert event["job"]["id"] == job["id"]
    assert 'governor_outside_resumes_total{source="slurm"} 1.0' in d.metrics()
    d.wait_rounds(6)
    assert slurm.state(job_id) == "R", "governor does not suspend it again while it holds"
    on_disk = Journal(d.workdir / "state")
    on_disk.load()
    assert not [key for key in on_disk.holds() if key.startswith("slurm:")]

    shown = slurm_jobs(d)[job_id]
    assert (shown["state"], shown["speed"], shown.get("outside")) == ("running", 1.0,
                                                                      "resumed")
    assert "gpu-hot" in " ".join(shown["reasons"]), "what governor would hold it for"
    assert d.get(f"/v1/jobs/{job['id']}").json()["outside"] == "resumed"
    assert d.get(f"/v1/jobs/{job['id']}/directive").json()["state"] == "pause"
    metrics = d.metrics()
    labels = f'id="{job["id"]}",job="fought"'
    assert f"governor_job_outside_resumed{{{labels}}} 1.0" in metrics
    assert f'governor_job_state_info{{{labels},reason="",state="running"}} 1.0' in metrics
    assert f"governor_job_paused{{{labels}}} 0.0" in metrics
    assert "running (resumed outside governor)" in line_of(d.cli("jobs").stdout, job["id"])

    gpus = cool()
    c_nvml.write(gpus)
    wait_for(lambda: slurm_jobs(d)[job_id]["state"] == "running"
             and "outside" not in slurm_jobs(d)[job_id], 5.0, "rule cleared", d)
    assert f"governor_job_outside_resumed{{{labels}}} 0.0" in d.metrics()
    assert "outside" not in line_of(d.cli("jobs").stdout, job["id"])
    heat_gpu_of(gpus, job)
    c_nvml.write(gpus)
    slurm.wait_state(job_id, "S", timeout=5)
    again = wait_for(lambda: (j := slurm_jobs(d)[job_id])["state"] == "paused" and j, 3.0,
                     "paused anew", d)
    assert "outside" not in again, "the next pause is governor's own"


def test_new_steps_stay_one_job_and_their_processes_are_held(
        slurm: SlurmCluster, daemon: Start, c_nvml: CNvmlState) -> None:
    gpus = cool()
    c_nvml.write(gpus)
    d = daemon(config(slurm, hold="signal"), c_nvml=c_nvml)
    script = "sleep 2; srun --overlap sleep 1000 & srun --overlap sleep 1000 & wait"
    job_id = slurm.sbatch("-w", "node1", "--gres=gpu:1", "-n", "1", "-J", "steps",
                          wrap=script)
    slurm.wait_state(job_id, "R")
    job = wait_for(lambda: slurm_jobs(d).get(job_id), 3.0, "governor job", d)
    wait_for(lambda: len(slurm.pids(job_id)) >= 4, 10.0, "the steps' processes", d)
    d.wait_rounds(4)
    assert list(slurm_jobs(d)) == [job_id], "still one governor job"
    heat_gpu_of(gpus, job)
    c_nvml.write(gpus)
    wait_for(lambda: states(slurm.pids(job_id)) == {"T"}, 5.0,
             "every step's processes stopped", d)


def test_the_task_prolog_and_epilog_register_and_unregister_a_job(
        slurm: SlurmCluster, daemon: Start, c_nvml: CNvmlState) -> None:
    c_nvml.write(cool())
    socket_path = slurm.dir / "run" / "governor.sock"
    d = daemon({"daemon": {"interval": 0.25}, "api": {"socket": str(socket_path)}},
               c_nvml=c_nvml)
    # a GOVERNOR_JOB_ID given at submit time is no sign that the job is registered
    env = {"GOVERNOR": str(Path(sys.executable).parent / "governor"),
           "GOVERNOR_CONFIG": str(d.config_path), "GOVERNOR_JOB_ID": "forged"}
    job_id = slurm.sbatch("-w", "node1", "--gres=gpu:1", "-J", "prologged", env=env,
                          wrap="echo registered as $GOVERNOR_JOB_ID; " + SPIN)
    slurm.wait_state(job_id, "R")

    def registered() -> dict[str, Any] | None:
        jobs = [j for j in d.get("/v1/jobs").json()
                if j.get("scheduler_id") == job_id]
        return jobs[0] if jobs else None
    job = wait_for(registered, 10.0, "the prolog's registration", d)
    assert (job["source"], job["name"], job["mode"]) == ("slurm", "prologged", "suspend")
    assert job["pid"] in slurm.pids(job_id)
    assert len(job["devices"]) == 1 and job["devices"][0] in ("gpu0", "gpu1")
    out = slurm.dir / "log" / f"job-{job_id}.out"
    wait_for(lambda: job["id"] in out.read_text(), 5.0, "GOVERNOR_JOB_ID in the job", d)

    slurm.run("scancel", job_id)
    wait_for(lambda: registered() is None, 10.0, "the epilog's unregistration", d)


def test_cgroup_hold_refuses_a_job_whose_cgroup_holds_slurmstepd(
        slurm: SlurmCluster, daemon: Start, c_nvml: CNvmlState) -> None:
    """Freezing the job's cgroup would freeze Slurm's step daemon with it: the job is
    left ungoverned, with the reason in the log, and never frozen."""
    c_nvml.write(cool())
    d = daemon(config(slurm, hold="cgroup"), c_nvml=c_nvml)
    job_id = slurm.sbatch("-w", "node1", "--gres=gpu:1", "-J", "frozen?", wrap=SPIN)
    slurm.wait_state(job_id, "R")
    wait_for(lambda: "slurmstepd" in d.log(), 5.0, "the refusal in the log", d)
    assert f"slurm job {job_id} (frozen?) cannot be governed" in d.log()
    d.wait_rounds(4)
    assert job_id not in slurm_jobs(d)
    assert d.log().count("cannot be governed") == 1, "logged once, not every round"


def test_a_two_node_job_is_suspended_as_one(
        slurm: SlurmCluster, daemon: Start, c_nvml: CNvmlState) -> None:
    """The daemon of node1 suspends a job that spans node1 and node2 (two slurmd on this
    host): Slurm stops its processes on both nodes at once, and resumes them together."""
    gpus = cool()
    c_nvml.write(gpus)
    d = daemon(config(slurm), c_nvml=c_nvml)
    job_id = slurm.sbatch("-N", "2", "--gres=gpu:1", "-J", "wide",
                          wrap="srun python3 -c 'while True: pass'")
    slurm.wait_state(job_id, "R")
    job = wait_for(lambda: slurm_jobs(d).get(job_id), 5.0, "governor job", d)
    wait_for(lambda: len(slurm.pids(job_id)) >= 5, 10.0, "the job's processes on both nodes", d)
    heat_gpu_of(gpus, job)
    c_nvml.write(gpus)
    slurm.wait_state(job_id, "S", timeout=5)
    wait_for(lambda: "R" not in states(slurm.pids(job_id)), 5.0,
             "every process of both nodes stopped", d)
    gpus = cool()
    c_nvml.write(gpus)
    slurm.wait_state(job_id, "R", timeout=5)
    wait_for(lambda: "R" in states(slurm.pids(job_id)), 5.0, "the processes running again", d)


# ---- who may name, hold and let go of a Slurm job ----


def socket_config(slurm: SlurmCluster, **slurm_settings: Any) -> dict[str, Any]:
    """config() with a unix socket in the cluster's directory (open to `nobody`)."""
    settings = config(slurm, **slurm_settings)
    run = Path(tempfile.mkdtemp(prefix="run-", dir=slurm.dir))
    settings["api"] = {"socket": str(run / "governor.sock")}
    return settings


def as_nobody(sock: Path, method: str, target: str,
              body: dict[str, Any] | None = None) -> tuple[int, str]:
    return unix_request(sock, method, target, json.dumps(body) if body else "", as_uid=NOBODY)


def nobodys_job(slurm: SlurmCluster, *args: str, wrap: str = "sleep 1000") -> str:
    """A batch job of `nobody`'s (root submits it for them), on node1."""
    return slurm.run("sbatch", "--parsable", "--uid", str(NOBODY), "--gid", str(NOBODY),
                     "--chdir=/tmp", "--output=/dev/null", "-w", "node1", *args,
                     "--wrap", wrap).stdout.strip()


@pytest.fixture
def strays() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_user_names_only_their_own_slurm_job_and_cannot_lift_an_operators_pause(
        slurm: SlurmCluster, daemon: Start, c_nvml: CNvmlState,
        strays: list[subprocess.Popen[bytes]]) -> None:
    """`nobody` forges SLURM_JOB_ID to have root's job suspended: refused, as is naming it
    from a process of their own job; their own job, named from its process, is theirs to
    pause and resume, but not once an operator paused it."""
    c_nvml.write(cool())
    settings = socket_config(slurm, discover=False)
    d = daemon(settings, c_nvml=c_nvml)
    sock = Path(settings["api"]["socket"])
    open_to_others(sock)
    victim = slurm.sbatch("-w", "node1", "-J", "victim", wrap="sleep 1000")
    mine = nobodys_job(slurm, "-J", "mine")
    slurm.wait_state(victim, "R")
    slurm.wait_state(mine, "R")
    forged = subprocess.Popen(["sleep", "1000"], user=NOBODY, env={"SLURM_JOB_ID": victim})
    strays.append(forged)
    in_mine = wait_for(lambda: [p for p in slurm.pids(mine) if Path(f"/proc/{p}").stat().st_uid
                                == NOBODY and Path(f"/proc/{p}/comm").read_text() == "sleep\n"],
                       10.0, "the sleep of nobody's job", d)[0]

    def register(pid: int, scheduler_id: str) -> tuple[int, str]:
        return as_nobody(sock, "POST", "/v1/jobs", {
            "name": "claim", "pid": pid, "mode": "suspend", "source": "slurm",
            "scheduler_id": scheduler_id})

    assert register(forged.pid, victim) == (
        403, f"Pid {forged.pid} is not a process of Slurm job {victim}.")
    assert register(in_mine, victim) == (
        403, f"Pid {in_mine} is not a process of Slurm job {victim}.")
    status, body = as_nobody(sock, "POST", "/v1/jobs", {
        "name": "k8s", "pid": forged.pid, "source": "kubernetes", "scheduler_id": "ns/pod"})
    assert (status, body) == (403, "Only root or a token holder may register a job from "
                                   "'kubernetes'.")
    status, body = register(in_mine, mine)
    assert status == 201, body
    job_id = json.loads(body)["id"]

    assert as_nobody(sock, "POST", f"/v1/jobs/{job_id}/pause")[0] == 200
    slurm.wait_state(mine, "S", timeout=10)
    assert as_nobody(sock, "POST", f"/v1/jobs/{job_id}/resume")[0] == 200
    slurm.wait_state(mine, "R", timeout=10)

    assert d.call("POST", f"/v1/jobs/{job_id}/pause").status_code == 200  # the operator's
    slurm.wait_state(mine, "S", timeout=10)
    assert as_nobody(sock, "POST", f"/v1/jobs/{job_id}/pause")[0] == 200  # takes nothing over
    lifted = as_nobody(sock, "POST", f"/v1/jobs/{job_id}/resume")
    assert lifted == (403, f"Job {job_id} was paused by token; only they, root or a token "
                           "holder may lift that hold.")
    assert as_nobody(sock, "DELETE", f"/v1/jobs/{job_id}")[0] == 403
    d.wait_rounds(3)
    assert slurm.state(mine) == "S"
    assert slurm.state(victim) == "R", "root's job was never suspended"
    assert d.call("POST", f"/v1/jobs/{job_id}/resume").status_code == 200
    slurm.wait_state(mine, "R", timeout=10)


def test_no_registration_hides_a_job_from_discovery_and_its_user_cannot_unregister_it(
        slurm: SlurmCluster, daemon: Start, c_nvml: CNvmlState,
        strays: list[subprocess.Popen[bytes]]) -> None:
    """Decoys registered for a job before it starts, by `nobody` (refused) and by a
    token holder (allowed), do not keep discovery from registering the job itself."""
    gpus = cool()
    c_nvml.write(gpus)
    settings = socket_config(slurm)
    d = daemon(settings, c_nvml=c_nvml)
    sock = Path(settings["api"]["socket"])
    open_to_others(sock)
    job_id = nobodys_job(slurm, "--hold", "--gres=gpu:1", "-J", "hidden?", wrap=SPIN)
    forged = subprocess.Popen(["sleep", "1000"], user=NOBODY, env={"SLURM_JOB_ID": job_id})
    stand_in = subprocess.Popen(["sleep", "1000"])
    strays += [forged, stand_in]
    status, _ = as_nobody(sock, "POST", "/v1/jobs", {
        "name": "decoy", "pid": forged.pid, "mode": "signal", "source": "slurm",
        "scheduler_id": job_id})
    assert status == 403
    decoy = d.register(name="decoy", pid=stand_in.pid, mode="signal", source="slurm",
                       scheduler_id=job_id)
    slurm.run("scontrol", "release", job_id)
    slurm.wait_state(job_id, "R")

    def discovered() -> dict[str, Any] | None:
        found = slurm_jobs(d).get(job_id)
        return found if found and found["id"] != decoy["id"] else None
    job = wait_for(discovered, 5.0, "the job as discovery found it", d)
    assert job["cgroup"].endswith(f"/job_{job_id}") and job["user"] == "nobody"
    assert [j["id"] for j in d.get("/v1/jobs").json()] == [job["id"]], "the decoy is gone"
    assert as_nobody(sock, "DELETE", f"/v1/jobs/{job['id']}") == (
        403, f"Job {job['id']} was found by the slurm source; only root or a token holder "
             "may unregister it.")
    heat_gpu_of(gpus, job)
    c_nvml.write(gpus)
    slurm.wait_state(job_id, "S", timeout=10)


def test_a_slurmctld_that_is_down_costs_only_its_own_jobs(
        slurm: SlurmCluster, daemon: Start, c_nvml: CNvmlState,
        strays: list[subprocess.Popen[bytes]]) -> None:
    """With slurmctld stopped, the Slurm job on a hot GPU cannot be suspended: that is
    reported on it, while a signal-mode job on the same GPU is paused as ever; once
    slurmctld is back, the Slurm job is suspended too."""
    gpus = cool()
    c_nvml.write(gpus)
    d = daemon(config(slurm), c_nvml=c_nvml)
    job_id = slurm.sbatch("-w", "node1", "--gres=gpu:1", "-J", "ctld-down", wrap=SPIN)
    slurm.wait_state(job_id, "R")
    job = wait_for(lambda: slurm_jobs(d).get(job_id), 5.0, "governor job", d)
    local = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    strays.append(local)
    d.register(name="local", pid=local.pid, mode="signal", devices=job["devices"])
    slurm.stop_controller()
    try:
        heat_gpu_of(gpus, job)
        c_nvml.write(gpus)
        wait_for(lambda: states([local.pid]) == {"T"}, 5.0, "the signal-mode job stopped", d)
        failed = wait_for(lambda: slurm_jobs(d)[job_id].get("error"), 30.0,
                          "the Slurm job's failure on its view", d)
        assert job_id in failed
        assert f"job {job['id']} (ctld-down): " in d.log()
        assert states([local.pid]) == {"T"}, "still held, round after round"
    finally:
        slurm.start_controller()
    slurm.wait_state(job_id, "S", timeout=30)
    wait_for(lambda: "error" not in slurm_jobs(d)[job_id], 5.0, "the error cleared", d)
