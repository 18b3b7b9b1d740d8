"""A stand-in `scontrol` on PATH, for what the real cluster cannot show: a slurmctld that
hangs on a call (the script waits while a file exists), a step socket Slurm no longer
answers for, or Slurm's suspend under proctrack/linuxproc or pgid (`scontrol suspend`
sends SIGSTOP to the job's processes and `resume` SIGCONT, as slurmd does there, and the
job's state follows), which the test cluster's proctrack/cgroup does not show: it
freezes. It is a real process that governor forks and
times out like the real one; what it answers is written to files by the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SCRIPT = r"""#!/bin/sh
dir='{dir}'
echo "$$ $*" >> "$dir/calls"
while [ -e "$dir/hang" ]; do sleep 0.02; done
if [ -e "$dir/fail" ]; then cat "$dir/fail" >&2; exit 1; fi
case "$1" in
  show) file="$dir/job_$4" ;;
  listpids) file="$dir/pids_$2" ;;
  suspend|resume)
    # as slurmd under proctrack/linuxproc or pgid: the job's state, and SIGSTOP/SIGCONT
    if [ "$1" = suspend ]; then from=RUNNING to=SUSPENDED sig=STOP
    else from=SUSPENDED to=RUNNING sig=CONT; fi
    if ! grep -q "JobState=$from" "$dir/job_$2"; then
      echo "scontrol_$1 error: Job is not in the state to $1" >&2; exit 1
    fi
    sed -i "s/JobState=$from/JobState=$to/" "$dir/job_$2"
    for pid in $(tail -n +2 "$dir/pids_$2" | cut -d' ' -f1); do kill -$sig "$pid"; done
    echo "$$ answered" >> "$dir/answered"; exit 0 ;;
  *) echo "$$ answered" >> "$dir/answered"; exit 0 ;;
esac
if [ ! -e "$file" ]; then
  echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1
fi
cat "$file"
echo "$$ answered" >> "$dir/answered"
"""


class FakeScontrol:
    """`scontrol` in `directory`/bin, first on PATH for the test (monkeypatched)."""

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch):
        self.dir = directory
        bin_dir = directory / "bin"
        bin_dir.mkdir(parents=True)
        script = bin_dir / "scontrol"
        script.write_text(SCRIPT.format(dir=directory))
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")

    def job(self, job_id: str, *, name: str = "fake", user: str = "nobody(65534)",
            state: str = "RUNNING", node: str = "node1", gres: str = "") -> None:
        """What `scontrol show job -d <job_id>` prints; `gres` as Slurm writes a node's
        ("gpu:1(IDX:0)")."""
        (self.dir / f"job_{job_id}").write_text(
            f"JobId={job_id} JobName={name}\n   UserId={user} GroupId=nogroup(65534)\n"
            "   Priority=1 Nice=0 Account=(null) QOS=normal\n"
            f"   JobState={state} Reason=None\n   Partition=debug AllocNode:Sid=h:1\n"
            f"     Nodes={node} CPU_IDs=0 Mem=0 GRES={gres}\n")

    def pids(self, job_id: str, pids: list[int]) -> None:
        """What `scontrol listpids <job_id>` prints."""
        rows = "".join(f"{pid} {job_id} batch 0 0\n" for pid in pids)
        (self.dir / f"pids_{job_id}").write_text(f"PID JOBID STEPID LOCALID GLOBALID\n{rows}")

    def hang(self) -> None:
        """Every call waits from now until `answer`, as against a hung slurmctld."""
        (self.dir / "hang").touch()

    def answer(self) -> None:
        (self.dir / "hang").unlink(missing_ok=True)

    def fail(self, complaint: str | None) -> None:
        """Every call fails with `complaint` (None: answers again)."""
        if complaint is None:
            (self.dir / "fail").unlink(missing_ok=True)
        else:
            (self.dir / "fail").write_text(complaint + "\n")

    def state(self, job_id: str) -> str:
        """The job's state, as `scontrol show job` says it."""
        text = (self.dir / f"job_{job_id}").read_text()
        return text.split("JobState=", 1)[1].split()[0]

    def calls(self) -> list[str]:
        """The arguments of every call so far, in order."""
        try:
            lines = (self.dir / "calls").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line.split(" ", 1)[1] for line in lines]

    def running(self) -> list[int]:
        """The pids of the calls that started and have not answered (nor been killed)."""
        def pids(name: str) -> list[int]:
            try:
                return [int(line.split()[0])
                        for line in (self.dir / name).read_text().splitlines()]
            except FileNotFoundError:
                return []
        answered = set(pids("answered"))
        return [pid for pid in pids("calls")
                if pid not in answered and Path(f"/proc/{pid}").exists()]
