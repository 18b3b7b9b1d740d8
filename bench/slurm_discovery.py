"""6. Slurm discovery: the daemon's CPU per round with 50 Slurm jobs running on the node
and discovered (`[slurm] discover = true`), against the same daemon with none.

A real single-node Slurm (tests/support/slurm_cluster.py: munged, slurmctld, one slurmd
named `benchnode`, CPUs=64, so 50 one-CPU `sleep 1000` jobs all run at once) and the real
daemon (`python -m governor run`) at its default interval of 1 s, with round_cost's
sources (32 hwmon sensors, a fake NVML with 8 GPUs, quiet rules). Discovery costs per
round, and 1 s is the round a node runs (round_cost's 50 ms would ask the spool 20 times
as often as anyone does). Two daemons run side by side, measured over the same windows so
that the machine's drift is the same for both: `on` (discovery on) and `off` (discovery
off). First with no jobs; then 50 jobs are submitted, `on` finds them (checked: 50 slurm
jobs in /v1/jobs, all running, each with its processes), `off` is given the same 50
through the API as the task prolog gives them; then the second window.

- figure: `on` with 50 jobs; peer: `on` with none (both CPU per round);
- `on` - `off` with 50 jobs: what discovery adds over governing the same jobs;
- discovery's poll timed on its own, in this process, on the cluster's real spool (CPU,
  no tick rounding, nothing else in it): the first polls (50 new jobs: `scontrol show job`
  and `scontrol listpids` each, on the source's worker, its CPU and the children's
  included), then 1,000 that find nothing new, as every round in steady state;
- a new job's one-off cost in the daemon: its CPU while it registered the 50, the forks
  (cutime + cstime) included, less the baseline rounds, per job.

CPU is utime + stime from /proc/PID/stat (all threads; clock ticks of 10 ms, so 0.17 ms per
round over 60 rounds) and, beside it, /proc/PID/task/*/schedstat (ns, live threads);
rounds from governor_rounds_total.

Target: discovery's poll <= 0.5 ms per round with 50 jobs, and no fork in steady state.
A whole round costs about 2 ms (benchmark 1) and one `scontrol` fork more than that, so
discovery must not fork once a job is known; 0.5 ms is a quarter of that round, 0.05% of a
CPU at 1 s, and a few times what one `scandir` of 50 sockets takes, so it fails only when
something per round grows with the jobs (a fork, a read per job). The whole-daemon
differences are reported, not judged: at 1 s they are a few ticks, within the noise.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Row, build_sysfs, daemon, eight_gpus, metric, workdir
from bench.round_cost import loaded_config
from governor.config import SlurmConfig
from governor.jobs.sources.slurm import SlurmSource
from tests.support.c_nvml import CNvmlState
from tests.support.daemon import DaemonProcess
from tests.support.slurm_cluster import SlurmCluster, slurm_missing

JOBS = 50
TARGET_ADDED_MS = 0.5
#: a node name of its own: Slurm's cgroups are slurm_<node>, and the tests use node1
NODE = "benchnode"
TICK = os.sysconf("SC_CLK_TCK")


def stat_seconds(pid: int) -> tuple[float, float]:
    """(utime + stime, cutime + cstime) of a process, in seconds, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / TICK, (cutime + cstime) / TICK


def run_ns(pid: int) -> tuple[int, int]:
    """The time on a CPU of the process's live threads, in ns (/proc/PID/task/*/schedstat:
    no tick rounding, but a thread that ended takes its time with it), and their number."""
    total, threads = 0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
            threads += 1
        except (OSError, ValueError):
            continue
    return total, threads


class Meter:
    """The daemon's CPU (own, children) and rounds since it was made."""

    def __init__(self, d: DaemonProcess):
        assert d.proc is not None
        self.d, self.pid = d, d.proc.pid
        self.rounds0 = metric(d.url, "governor_rounds_total")
        self.own0, self.kids0 = stat_seconds(self.pid)
        self.ns0, self.threads0 = run_ns(self.pid)

    def read(self) -> tuple[float, float, int]:
        rounds = metric(self.d.url, "governor_rounds_total")
        own, kids = stat_seconds(self.pid)
        ns, self.threads = run_ns(self.pid)
        self.precise_ms = (ns - self.ns0) / 1e6
        return own - self.own0, kids - self.kids0, int(rounds - self.rounds0)


def per_round(daemons: dict[str, DaemonProcess], seconds: float) -> dict[str, Any]:
    """Each daemon's CPU per round over the same `seconds`, its children's, the rounds."""
    meters = {name: Meter(d) for name, d in daemons.items()}
    time.sleep(seconds)
    out: dict[str, Any] = {}
    for name, meter in meters.items():
        own, kids, rounds = meter.read()
        out[name] = {"ms_per_round": own * 1000 / rounds,
                     "children_ms_per_round": kids * 1000 / rounds, "rounds": rounds,
                     "tick_ms_per_round": 1000 / TICK / rounds,
                     "schedstat_ms_per_round": meter.precise_ms / rounds,
                     "threads": [meter.threads0, meter.threads]}
    out["load"] = os.getloadavg()[0]
    return out


def slurm_jobs(d: DaemonProcess) -> int:
    return sum(1 for j in d.get("/v1/jobs").json() if j.get("source") == "slurm")


def register_copies(d: DaemonProcess, control: DaemonProcess) -> str:
    """The jobs `d` discovered, registered with `control` through the API, as the task
    prolog registers them (deploy/slurm/task_prolog.sh); how."""
    for job in d.get("/v1/jobs").json():
        if job.get("source") != "slurm":
            continue
        body = {"name": job["name"], "cgroup": job["cgroup"], "pid": job["pid"],
                "mode": job["mode"], "devices": job["devices"], "priority": job["priority"],
                "source": "slurm", "scheduler_id": job["scheduler_id"]}
        control.register(**{k: v for k, v in body.items() if v is not None})
    return "POST /v1/jobs, source slurm, the discovered job's cgroup and mode"


def poll_cost(conf: Path, repeats: int) -> dict[str, Any]:
    """Discovery itself, timed in this process on the cluster's real spool: the first
    polls (every job new: its `scontrol` forks, on the source's worker thread, until the
    worker has answered for all), then a poll that finds nothing changed, as every round
    does in steady state; no tick rounding, nothing else in the round."""
    source = SlurmSource(SlurmConfig(discover=True, conf=str(conf)))
    wall, cpu = time.perf_counter(), time.process_time()
    kids = os.times().children_user + os.times().children_system
    first = source.poll()
    found = list(first.started)
    while source._asking:  # a job handed to the worker whose answer no poll took yet
        time.sleep(0.001)
        first = source.poll()
        found.extend(first.started)
    kids = os.times().children_user + os.times().children_system - kids
    first_wall, first_cpu = time.perf_counter() - wall, time.process_time() - cpu
    if first.problems:  # a failed job is asked for again each poll: not steady state
        raise RuntimeError(f"discovery's first poll: {first.problems[:3]}")
    began, cpu, done = time.perf_counter(), time.process_time(), 0
    while done < repeats and time.perf_counter() - began < 10:
        assert not source.poll().started
        done += 1
    steady = (time.process_time() - cpu) / done
    steady_wall = (time.perf_counter() - began) / done
    repeats = done
    source.close()
    return {"found": len(found), "problems": list(first.problems),
            "first_poll_wall_ms_per_job": first_wall * 1000 / max(1, len(found)),
            "first_poll_cpu_ms_per_job": (first_cpu + kids) * 1000 / max(1, len(found)),
            "steady_poll_ms": steady * 1000, "steady_poll_wall_ms": steady_wall * 1000,
            "repeats": repeats}


def wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s")
        time.sleep(0.2)


def measure(path: Path, seconds: float) -> dict[str, Any]:
    sys_root = build_sysfs(path / "sysfs")
    nvml = CNvmlState(path / "nvml.state", log_calls=False)
    nvml.write(eight_gpus())
    cluster = SlurmCluster(path / "slurm", (NODE,), cpus=64)
    out: dict[str, Any] = {"interval_s": 1.0, "seconds": seconds, "jobs": JOBS}
    try:
        (path / "slurm").mkdir()
        cluster.start()
        base = loaded_config(sys_root, 1.0)
        on = {**base, "slurm": {"discover": True, "conf": str(cluster.conf),
                                "hold": "suspend"}}
        for sub in ("on", "off"):
            (path / sub).mkdir()
        with daemon(path / "on", on, c_nvml=nvml) as d, \
                daemon(path / "off", base, c_nvml=nvml) as control:
            both = {"on": d, "off": control}
            d.wait_rounds(5)
            out["no_jobs"] = per_round(both, seconds)
            meter, began = Meter(d), time.monotonic()
            for i in range(JOBS):
                cluster.sbatch("-w", NODE, "-J", f"bench{i}", wrap="sleep 1000")
            wait(lambda: slurm_jobs(d) == JOBS, 120, f"{JOBS} slurm jobs in /v1/jobs")
            d.wait_rounds(2)
            own, kids, rounds = meter.read()
            added = own - rounds * out["no_jobs"]["on"]["ms_per_round"] / 1000
            out["registration"] = {
                "seconds": time.monotonic() - began, "rounds": rounds,
                "daemon_ms_per_job": added * 1000 / JOBS,
                "scontrol_ms_per_job": kids * 1000 / JOBS}
            running = cluster.run("squeue", "-h", "-t", "R", "-o", "%i").stdout.split()
            assert len(running) == JOBS, f"{len(running)} of {JOBS} jobs running"
            out["api_registration"] = register_copies(d, control)
            out["poll"] = poll_cost(cluster.conf, 1000)
            assert out["poll"]["found"] == JOBS, out["poll"]
            d.wait_rounds(3)
            out["jobs"] = per_round(both, seconds)
            out["jobs"]["registered"] = slurm_jobs(d)
            assert out["jobs"]["registered"] == JOBS, out["jobs"]["registered"]
            assert slurm_jobs(control) == JOBS
            running = cluster.run("squeue", "-h", "-t", "R", "-o", "%i").stdout.split()
            assert len(running) == JOBS, f"{len(running)} of {JOBS} jobs still running"
            # squeue says R of a job whose slurmstepd was killed (another cluster's clean-up
            # on this host, before tests/support/slurm_cluster.py kept to its own)
            alive = sum(1 for job in running if cluster.pids(job))
            assert alive == JOBS, f"{JOBS - alive} jobs lost their slurmstepd meanwhile"
    finally:
        cluster.stop()
    return out


def run(quick: bool) -> list[Row]:
    missing = slurm_missing()
    name = f"6. Slurm discovery, {JOBS} jobs (CPU)"
    if missing is not None:
        return [Row(name, f"skipped: {missing}")]
    # a SIGTERM (`timeout`, `kill`) unwinds through measure's finally: the cluster stops
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with workdir("slurm") as path:
            found = measure(path, 10 if quick else 60)
    except Exception as exc:  # a broken run is a failed row, not a crashed bench
        return [Row(name, f"error: {type(exc).__name__}: {exc}"[:300], passed=False)]
    finally:
        signal.signal(signal.SIGTERM, previous)
    jobs, none, poll = found["jobs"], found["no_jobs"], found["poll"]
    figure, peer = jobs["on"]["ms_per_round"], none["on"]["ms_per_round"]
    added = figure - peer
    #: the same 50 jobs governed, registered through the API instead: what discovery adds
    discovery = figure - jobs["off"]["ms_per_round"]
    reg = found["registration"]
    found["added_ms_per_round"] = added
    found["discovery_ms_per_round"] = discovery
    return [Row(
        name,
        f"{figure:.2f} ms/round (+{added:.2f}; discovery's poll "
        f"{poll['steady_poll_ms']:.2f} ms, daemon vs API-registered {discovery:+.2f}); "
        f"new job {reg['daemon_ms_per_job'] + reg['scontrol_ms_per_job']:.0f} ms CPU once",
        f"no jobs {peer:.2f} ms/round", f"{figure / peer:.2f}",
        f"poll <= {TARGET_ADDED_MS:g} ms/round, no fork in steady state",
        poll["steady_poll_ms"] <= TARGET_ADDED_MS
        and jobs["on"]["children_ms_per_round"] == 0, found)]
