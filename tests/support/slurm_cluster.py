"""A real Slurm cluster on localhost, for the tests: munged, slurmctld and one slurmd per
node, all from Debian's packages, in a directory of the test's own.

Each node is a slurmd started with `-N <node>` (Debian builds Slurm with
multiple-slurmd, so several nodes can live on one host, each with a port of its own).
Jobs are tracked by proctrack/cgroup, as on most production clusters, so each job has
the cgroup `freezer/slurm_<node>/uid_<uid>/job_<id>` that governor holds it through; each
node offers GPUs as GRES backed by character devices made in the directory (`c 1 3`, the
same device as /dev/null: nothing opens them, and ConstrainDevices is off).

`stop()` cancels every job, stops the daemons, kills whatever is left of them, and
removes the cgroups Slurm made, so a test leaves nothing running.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def slurm_missing() -> str | None:
    """Why a real cluster cannot run here, or None."""
    for binary in ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "munged"):
        if shutil.which(binary) is None and not Path("/usr/sbin", binary).exists():
            return f"{binary} is not installed (Debian: slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "a Slurm cluster needs root (slurmd runs jobs as their users)"
    if not Path("/etc/munge/munge.key").exists():
        return "/etc/munge/munge.key is missing (installed by Debian's munge package)"
    if not (CGROUP_ROOT / "freezer").is_dir():
        return "no cgroup v1 freezer for proctrack/cgroup"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    def __init__(self, workdir: Path, nodes: Sequence[str] = ("node1",), *, gpus: int = 2,
                 cpus: int = 64, task_prolog: Path | None = None,
                 task_epilog: Path | None = None, slurmd_env: dict[str, str] | None = None):
        self.dir = workdir
        self.nodes = tuple(nodes)
        self.gpus = gpus
        self.cpus = cpus
        self.conf = workdir / "slurm.conf"
        #: munged runs as the munge user, who cannot reach into pytest's private temporary
        #: directories: it gets one of its own, open to it
        self.munge_dir = Path(tempfile.mkdtemp(prefix="governor-munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._controller: subprocess.Popen[bytes] | None = None
        self.started = False
        self.task_prolog, self.task_epilog = task_prolog, task_epilog
        #: more environment for slurmd, which its prologs inherit
        self.slurmd_env = dict(slurmd_env or {})

    # ---- set-up --------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def spool(self, node: str) -> Path:
        return self.dir / "spool" / node

    def _write_config(self) -> None:
        ports = _free_ports(1 + len(self.nodes))
        for sub in ("state", "log", "dev", *(f"spool/{n}" for n in self.nodes)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        munge = pwd.getpwnam("munge")
        self.munge_dir.chmod(0o755)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        gres_lines = []
        for node in self.nodes:
            for index in range(self.gpus):
                device = self.dir / "dev" / f"{node}-nvidia{index}"
                if not device.exists():
                    os.mknod(device, 0o666 | 0o020000, os.makedev(1, 3))
            last = self.gpus - 1
            gres_lines.append(f"NodeName={node} Name=gpu "
                              f"File={self.dir}/dev/{node}-nvidia[0-{last}]")
        node_lines = [f"NodeName={node} NodeHostname=localhost Port={port} CPUs={self.cpus} "
                      f"RealMemory=1000 Gres=gpu:{self.gpus} State=UNKNOWN"
                      for node, port in zip(self.nodes, ports[1:], strict=True)]
        d = self.dir
        self.conf.write_text("\n".join([
            "ClusterName=governortest",
            "SlurmctldHost=localhost",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={ports[0]}",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "ProctrackType=proctrack/cgroup",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "SchedulerType=sched/backfill",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=2",
            "GresTypes=gpu",
            *node_lines,
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES "
            "MaxTime=INFINITE State=UP",
            *([f"TaskProlog={self.task_prolog}"] if self.task_prolog else []),
            *([f"TaskEpilog={self.task_epilog}"] if self.task_epilog else []),
            f"PartitionName=urgent Nodes={','.join(self.nodes)} MaxTime=INFINITE State=UP",
            "",
        ]))
        (d / "gres.conf").write_text("\n".join(gres_lines) + "\n")
        (d / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nConstrainCores=no\n"
                                       "ConstrainDevices=no\nConstrainRAMSpace=no\n")

    def _spawn(self, argv: list[str], log_name: str, env: dict[str, str] | None = None) -> None:
        log = open(self.dir / "log" / log_name, "ab")  # noqa: SIM115 - kept by Popen
        with log:
            self._procs.append(subprocess.Popen(argv, env={**self.env, **(env or {})},
                                                stdout=log,
                                                stderr=subprocess.STDOUT,
                                                start_new_session=True))

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        self._write_config()
        m = self.munge_dir
        self._spawn(["runuser", "-u", "munge", "--", _binary("munged"), "--foreground",
                     f"--socket={self.munge_socket}", f"--pid-file={m}/munged.pid",
                     f"--seed-file={m}/seed", f"--log-file={m}/munged.log"], "munged.out")
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged's socket")
        self.start_controller()
        for node in self.nodes:
            self._spawn([_binary("slurmd"), "-D", "-N", node], f"slurmd-{node}.out",
                        self.slurmd_env)
        self.started = True
        self._wait(self._all_idle, timeout, "every node idle in sinfo")
        return self

    def start_controller(self) -> None:
        """slurmctld, in the foreground, as at start (and again after stop_controller)."""
        self._spawn([_binary("slurmctld"), "-D"], "slurmctld.out")
        self._controller = self._procs[-1]

    def stop_controller(self) -> None:
        """Stop slurmctld, as when it fails: the nodes and their jobs keep running, and
        every `scontrol` that needs it fails."""
        proc = self._controller
        assert proc is not None
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        self._procs.remove(proc)
        self._controller = None

    def _all_idle(self) -> bool:
        result = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
        return all(states.get(node, "").rstrip("*") == "idle" for node in self.nodes)

    def _wait(self, ready: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if callable(ready) and ready():
                return
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) while "
                                       f"waiting for {what}:\n{self.logs()}")
            time.sleep(0.2)
        raise TimeoutError(f"no {what} after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for path in sorted((self.dir / "log").glob("*.log")):
            out.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-1500:])
        return "\n".join(out)

    # ---- using it ------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 30.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env={**self.env, **(env or {})},
                              capture_output=True, text=True, check=check, timeout=timeout)

    def sbatch(self, *args: str, wrap: str = "sleep 1000",
               env: dict[str, str] | None = None) -> str:
        """Submit a batch job; its id. `env`: more environment for the job (and its task
        prolog, which runs in it)."""
        return self.run("sbatch", "--parsable", f"--chdir={self.dir}",
                        f"--output={self.dir}/log/job-%j.out", *args,
                        "--wrap", wrap, env=env).stdout.strip()

    def state(self, job_id: str) -> str:
        """squeue's compact state (R, S, PD, CG...), "" once the job is gone."""
        result = self.run("squeue", "-h", "-j", job_id, "-o", "%t", check=False)
        return result.stdout.strip()

    def wait_state(self, job_id: str, state: str, timeout: float = 20.0) -> None:
        self._wait(lambda: self.state(job_id) == state, timeout,
                   f"job {job_id} in state {state!r} (now {self.state(job_id)!r})")

    def pids(self, job_id: str) -> list[int]:
        """The job's processes on every node of the cluster. Each node is asked by name:
        with several slurmd on one host, `scontrol listpids` alone asks only one of them."""
        found: list[int] = []
        for node in self.nodes:
            result = self.run("scontrol", "listpids", job_id, node, check=False)
            found += [int(line.split()[0]) for line in result.stdout.splitlines()[1:]
                      if line.split() and line.split()[0].isdigit()]
        return sorted(set(found))

    # ---- tear-down -----------------------------------------------------------------

    def stop(self) -> None:
        if self.started:
            self.run("scancel", "--full", "--state=SUSPENDED", "-u", "root", check=False)
            self.run("scancel", "--full", "-u", "root", check=False)
            for job in self.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
                self.run("scontrol", "resume", job, check=False)
            self.run("scancel", "--full", "-u", "root", check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.run(
                    "squeue", "-h", check=False).stdout.strip():
                time.sleep(0.2)
            self.started = False
        for proc in reversed(self._procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self._procs.clear()
        self._kill_leftovers()
        for node in self.nodes:
            remove_cgroups(f"slurm_{node}")
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """slurmstepd and job processes outlive their slurmd when it is killed. Only this
        cluster's: slurmd gives its slurmstepd its environment, SLURM_CONF included, and
        the jobs have sbatch's; another cluster on the host (a test, a bench) keeps its own."""
        conf = f"SLURM_CONF={self.conf}".encode()
        for pid in _pids():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if conf in environ.split(b"\0"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def remove_cgroups(top: str) -> None:
    """Remove Slurm's cgroup tree `top` in every hierarchy, deepest first (thawed first,
    since a frozen v1 cgroup's tasks cannot leave)."""
    for hierarchy in CGROUP_ROOT.iterdir():
        root = hierarchy / top
        if not root.is_dir():
            continue
        with contextlib.suppress(OSError):
            (root / "freezer.state").write_text("THAWED")
        for directory in sorted((p for p in root.rglob("*") if p.is_dir()),
                                key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()
