"""What the node's Slurm holds: the slurmd spool, and `scontrol` for what it lacks.

Discovery must be cheap, because it runs every round: listing the spool directory costs
one `scandir`, and each running job step has a socket there named
`<node>_<job>.<step>` (slurmstepd's; Slurm's own tools find steps the same way). Only when
that set changes is `scontrol` run, once per new job, for its name, owner, QOS, partition
and GPUs, and once for its pids. `run_scontrol` also carries the suspend actuator's `scontrol
suspend` and `resume`, which are sent from governor/actuators/suspend.py alone.

Nothing here decides anything: the job source and the suspend actuator do.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: Slurm's compiled-in default for SlurmdSpoolDir
DEFAULT_SPOOL = "/var/spool/slurmd"
#: where slurm.conf is when neither the config nor $SLURM_CONF says
DEFAULT_CONF = "/etc/slurm/slurm.conf"
#: a step socket in the spool: <node>_<job id>.<step id>
STEP_SOCKET = re.compile(r"^(?P<node>.+)_(?P<job>\d+)\.(?P<step>\d+)$")
SCONTROL_TIMEOUT = 10.0


class SlurmError(Exception):
    """scontrol failed or could not be run; the message is its one-line complaint."""


@dataclass(frozen=True, slots=True)
class SlurmSite:
    """How to reach this node's Slurm: the slurm.conf to use ("" for Slurm's own choice)."""

    conf: str = ""

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.conf:
            env["SLURM_CONF"] = self.conf
        return env

    @property
    def conf_path(self) -> str:
        return self.conf or os.environ.get("SLURM_CONF") or DEFAULT_CONF


def read_conf(path: str) -> dict[str, str]:
    """slurm.conf's simple `Key=Value` settings (not the NodeName/PartitionName lines),
    keys lowercased, as Slurm reads them; {} if the file cannot be read."""
    settings: dict[str, str] = {}
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return settings
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        key, sep, value = line.partition("=")
        if sep and " " not in key.strip():
            settings.setdefault(key.strip().lower(), value.strip())
    return settings


def spool_dirs(site: SlurmSite) -> list[str]:
    """The slurmd spool directories on this node: SlurmdSpoolDir with %n (the node's
    name, for several slurmd on one host) and %h (the host's) matching any."""
    pattern = read_conf(site.conf_path).get("slurmdspooldir", DEFAULT_SPOOL)
    if "%" not in pattern:
        return [pattern]
    return sorted(glob.glob(pattern.replace("%n", "*").replace("%h", "*")))


@dataclass(frozen=True, slots=True)
class Step:
    node: str
    job_id: str
    step_id: str


def running_steps(spools: Iterable[str]) -> frozenset[Step]:
    """Every job step slurmd runs on this node, from the sockets in its spool."""
    steps = set()
    for spool in spools:
        try:
            entries = list(os.scandir(spool))
        except OSError:
            continue
        for entry in entries:
            match = STEP_SOCKET.match(entry.name)
            if match is not None:
                steps.add(Step(match["node"], match["job"], match["step"]))
    return frozenset(steps)


def run_scontrol(site: SlurmSite, *args: str) -> str:
    """scontrol's output; SlurmError with its complaint if it fails."""
    try:
        done = subprocess.run(["scontrol", *args], env=site.env, capture_output=True,
                              text=True, timeout=SCONTROL_TIMEOUT, check=False)
    except FileNotFoundError:
        raise SlurmError("scontrol is not installed") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"scontrol {' '.join(args)} took over {SCONTROL_TIMEOUT:g} s") from None
    if done.returncode != 0:
        complaint = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise SlurmError(complaint[-1] if complaint else f"scontrol exited {done.returncode}")
    return done.stdout


@dataclass(frozen=True, slots=True)
class SlurmJob:
    """What `scontrol show job -d` says of a job."""

    job_id: str
    name: str
    user: str
    uid: int | None
    qos: str
    partition: str
    state: str
    #: node -> the GPU indices (GRES IDX) the job holds there
    gpus: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


_FIELD = re.compile(r"(?:^|\s)(?P<key>[A-Za-z_/:]+)=(?P<value>\S*)")
_NODE_GRES = re.compile(r"^\s*Nodes=(?P<nodes>\S+) .*\bGRES=(?P<gres>\S*)", re.MULTILINE)
_GPU_IDX = re.compile(r"gpu(?::[^:(,]+)?:\d+\(IDX:(?P<idx>[\d,-]+)\)")


def parse_show_job(text: str) -> SlurmJob | None:
    """Parse `scontrol show job -d <id>` (its multi-line form: the job name runs to the end
    of the first line, so a name with spaces survives)."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("JobId="):
        return None
    first, _, name = lines[0].partition(" JobName=")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if line.lstrip().startswith("Nodes="):
            continue
        for match in _FIELD.finditer(line):
            fields.setdefault(match["key"], match["value"])
    user, uid = fields.get("UserId", ""), None
    owner = re.match(r"^(?P<user>[^(]*)\((?P<uid>\d+)\)$", user)
    if owner is not None:
        user, uid = owner["user"], int(owner["uid"])
    gpus: dict[str, tuple[int, ...]] = {}
    for match in _NODE_GRES.finditer(text):
        indices = tuple(i for found in _GPU_IDX.finditer(match["gres"])
                        for i in expand_ranges(found["idx"]))
        for node in expand_hostlist(match["nodes"]):
            gpus[node] = gpus.get(node, ()) + indices
    return SlurmJob(job_id=first.removeprefix("JobId="), name=name, user=user, uid=uid,
                    qos=_unset(fields.get("QOS", "")),
                    partition=_unset(fields.get("Partition", "")),
                    state=fields.get("JobState", ""), gpus=gpus)


def _unset(value: str) -> str:
    return "" if value in ("(null)", "N/A") else value


def expand_ranges(text: str) -> list[int]:
    """"0-2,5" -> [0, 1, 2, 5]."""
    out: list[int] = []
    for part in text.split(","):
        low, sep, high = part.partition("-")
        if low.isdigit() and (not sep or high.isdigit()):
            out.extend(range(int(low), int(high if sep else low) + 1))
    return out


def expand_hostlist(text: str) -> list[str]:
    """Slurm's host list: "node[1-3,7],gpu01" -> node1 node2 node3 node7 gpu01 (the
    zero-padding of a range is kept: "n[01-02]" -> n01 n02)."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?([^,\[]*)", text):
        prefix, ranges, suffix = match.group(1), match.group(2), match.group(3)
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            low, sep, high = part.partition("-")
            if not sep:
                hosts.append(prefix + low + suffix)
                continue
            width = len(low)
            hosts.extend(f"{prefix}{n:0{width}d}{suffix}" for n in range(int(low), int(high) + 1))
    return hosts


def show_job(site: SlurmSite, job_id: str) -> SlurmJob | None:
    """The job, or None if Slurm no longer knows it."""
    try:
        return parse_show_job(run_scontrol(site, "show", "job", "-d", job_id))
    except SlurmError as exc:
        if "Invalid job id" in str(exc):
            return None
        raise


def list_pids(site: SlurmSite, job_id: str, node: str | None = None) -> list[int]:
    """The job's processes on this node (`scontrol listpids`, which asks slurmstepd).
    `node`: the slurmd to ask, where a host runs several (multiple-slurmd): without it
    scontrol asks the first node of slurm.conf on this host, and finds none of another's."""
    try:
        text = run_scontrol(site, "listpids", job_id, *([node] if node else []))
    except SlurmError as exc:
        if "not found" in str(exc).lower() or "no steps" in str(exc).lower():
            return []
        raise
    pids = []
    for line in text.splitlines()[1:]:
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        if first.isdigit():
            pids.append(int(first))
    return pids


def already(exc: SlurmError, what: str) -> bool:
    """True when scontrol refused because the job is already in the state asked for
    ("Job is already suspended" / "Job is not suspended")... or is gone."""
    text = str(exc).lower()
    if "invalid job id" in text or "already completing or completed" in text:
        return True
    if what == "suspend":
        return "already suspended" in text
    return "not suspended" in text
