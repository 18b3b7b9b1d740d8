"""A token is not root over every process: the node's own services are never held, and a
signal-mode cgroup must be a cgroup.

Real daemons and real processes. The services are real root processes whose executable
is a copy of sleep(1) named as the service (`sshd`): governor tells a service by what a
process cannot forge (its executable, its systemd unit, its uid), so a copy of sleep
that runs as root from a file named sshd is, to it, exactly an sshd. A process that
only calls itself sshd (its comm) is not.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from governor.host.cgroupfs import find_hierarchies
from tests.support.daemon import DaemonProcess
from tests.support.processes import eventually, in_a_root_of_its_own, state, stays, stop

StartDaemon = Callable[..., DaemonProcess]
ROOT = os.geteuid() == 0
QUIET = {"daemon": {"interval": 0.25}, "sources": {"nvml": "off"}}

pytestmark = pytest.mark.skipif(not ROOT, reason="a service runs as root: the test must too")


@pytest.fixture
def programs() -> Iterator[Path]:
    """A directory anyone may read, for copies of sleep(1) under the names of services."""
    folder = Path(tempfile.mkdtemp(prefix="governor-svc-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def program(folder: Path, name: str) -> Path:
    sleep = shutil.which("sleep")
    assert sleep is not None
    path = folder / name
    shutil.copy(sleep, path)
    path.chmod(0o755)
    return path


def run(children: list[subprocess.Popen[bytes]], args: list[str],
        user: int | None = None) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(args, user=user)
    children.append(process)
    return process


def test_a_root_service_is_refused_by_its_executable_not_its_name(
        daemon: StartDaemon, programs: Path, children: list[subprocess.Popen[bytes]]) -> None:
    sshd = program(programs, "sshd")
    service = run(children, [str(sshd), "600"])
    users_own = run(children, [str(sshd), "600"], user=65534)
    named_only = run(children, [sys.executable, "-c", "import time\n"
                               "open('/proc/self/comm', 'w').write('sshd')\n"
                               "time.sleep(600)"])
    eventually(lambda: psutil.Process(named_only.pid).name() == "sshd")
    d = daemon(QUIET)

    for mode in ("signal", "cgroup"):
        refused = d.call("POST", "/v1/jobs", json={"name": "ssh", "pid": service.pid,
                                                    "mode": mode})
        assert refused.status_code == 403, refused.text
        assert refused.json() == {"error": f"Pid {service.pid} is sshd ({sshd}), one of "
                                           "the node's services, which governor never holds."}
    assert d.call("POST", "/v1/jobs", json={"name": "x", "pid": service.pid,
                                            "mode": "signal"}).status_code == 403
    # what a user can do: a process of their own called sshd, or run from a file named so
    for process in (named_only, users_own):
        job = d.register(name="not-a-service", pid=process.pid)
        assert d.call("POST", f"/v1/jobs/{job['id']}/pause").status_code == 200
        assert state(process.pid) == "T"
        assert d.call("DELETE", f"/v1/jobs/{job['id']}").status_code == 204
    assert state(service.pid) != "T"


def test_the_deny_list_is_configurable(
        daemon: StartDaemon, programs: Path, children: list[subprocess.Popen[bytes]]) -> None:
    """An entry with a "/" names one executable by its path; an empty list protects no
    executable (the units still would)."""
    ours = program(programs, "site-daemon")
    sshd = program(programs, "sshd")
    site = run(children, [str(ours), "600"])
    copy = run(children, [str(sshd), "600"])
    d = daemon({**QUIET, "jobs": {"protected_executables": [str(ours)]}})
    refused = d.call("POST", "/v1/jobs", json={"name": "site", "pid": site.pid})
    assert refused.status_code == 403
    assert f"is site-daemon ({ours})" in refused.json()["error"]
    d.register(name="sshd no longer listed", pid=copy.pid)


def test_a_held_tree_never_stops_a_service_inside_it(
        daemon: StartDaemon, programs: Path, children: list[subprocess.Popen[bytes]]) -> None:
    """A job's tree that comes to hold a service (a root job started one): the job is
    paused, the service runs on."""
    sshd = program(programs, "sshd")
    shell = run(children, ["sh", "-c", f"{sshd} 600 & sleep 600 & wait"])
    eventually(lambda: len(psutil.Process(shell.pid).children()) == 2)
    children = {Path(f"/proc/{c.pid}/exe").resolve(): c.pid
                for c in psutil.Process(shell.pid).children()}
    service = children.pop(sshd.resolve())
    (plain,) = children.values()
    d = daemon(QUIET)
    job = d.register(name="tree", pid=shell.pid, mode="signal")
    assert d.call("POST", f"/v1/jobs/{job['id']}/pause").status_code == 200
    eventually(lambda: state(shell.pid) == "T" and state(plain) == "T")
    stays(lambda: state(service) != "T", 0.5, what="the service inside the tree runs on")
    assert d.call("POST", f"/v1/jobs/{job['id']}/resume").status_code == 200
    eventually(lambda: state(plain) != "T")


@pytest.fixture
def own_cgroup(children: list[subprocess.Popen[bytes]]) -> Iterator[Path]:
    """A cgroup v2 (else v1 freezer) cgroup of the test's own, removed once the test's
    processes are gone."""
    hierarchies = find_hierarchies()
    h = hierarchies.get("v2") or hierarchies.get("freezer")
    if h is None:
        pytest.skip("no cgroup v2 or v1 freezer is mounted")
    directory = h.dir(f"/test-svc-{uuid.uuid4().hex[:8]}")
    directory.mkdir()
    yield directory
    for process in children:
        stop(process)
    if (directory / "freezer.state").exists():
        (directory / "freezer.state").write_text("THAWED")
    eventually(lambda: not (directory / "cgroup.procs").read_text().split())
    directory.rmdir()


def test_a_cgroup_holding_a_service_is_never_frozen(
        daemon: StartDaemon, programs: Path, children: list[subprocess.Popen[bytes]],
        own_cgroup: Path) -> None:
    sshd = program(programs, "sshd")
    service = run(children, [str(sshd), "600"])
    (own_cgroup / "cgroup.procs").write_text(str(service.pid))
    d = daemon(QUIET)
    refused = d.call("POST", "/v1/jobs", json={"name": "c", "cgroup": str(own_cgroup),
                                               "mode": "cgroup"})
    assert refused.status_code == 403, refused.text
    assert refused.json() == {"error": f"cgroup {own_cgroup} holds pid {service.pid}, sshd "
                                       f"({sshd}), one of the node's services"}


def test_signal_mode_takes_only_a_real_cgroup(
        daemon: StartDaemon, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    """Anyone can make a directory with a cgroup.procs file naming any pid; only one in a
    mounted cgroup file system is a cgroup, whichever way it is spelt."""
    victim = run(children, ["sleep", "600"])
    fake = tmp_path / "x"
    fake.mkdir()
    (fake / "cgroup.procs").write_text(f"{victim.pid}\n")
    d = daemon(QUIET)
    spellings = [str(fake)]
    v2 = find_hierarchies().get("v2")
    if v2 is not None:  # a cgroup path, resolved under the cgroup2 mount, that climbs out
        spellings.append("/" + posixpath.relpath(fake, v2.mount))
    for given in spellings:
        refused = d.call("POST", "/v1/jobs", json={"name": "fake", "cgroup": given,
                                                   "mode": "signal"})
        assert refused.status_code == 422, refused.text
        assert refused.json() == {"error": f"{given} is not a cgroup: it lies in no "
                                           "mounted cgroup file system"}
    assert d.get("/v1/jobs").json() == []
    assert state(victim.pid) != "T"


def test_a_root_process_in_a_listed_unit_is_refused(
        daemon: StartDaemon, children: list[subprocess.Popen[bytes]]) -> None:
    """A unit is read from the process's cgroup, which it cannot leave without root: here
    a cgroup named as systemd names a service's, with a plain sleep in it."""
    v2 = find_hierarchies().get("v2")
    if v2 is None:
        pytest.skip("no cgroup v2 is mounted")
    unit = f"test-svc-{uuid.uuid4().hex[:8]}.service"
    directory = v2.dir(f"/{unit}")
    directory.mkdir()
    try:
        inside = run(children, ["sleep", "600"])
        (directory / "cgroup.procs").write_text(str(inside.pid))
        d = daemon({**QUIET, "jobs": {"protected_units": [unit]}})
        refused = d.call("POST", "/v1/jobs", json={"name": "unit", "pid": inside.pid})
        assert refused.status_code == 403, refused.text
        assert refused.json() == {"error": f"Pid {inside.pid} is a process of {unit}, one "
                                           "of the node's services, which governor never "
                                           "holds."}
    finally:
        for process in children:
            stop(process)
        eventually(lambda: not (directory / "cgroup.procs").read_text().split())
        directory.rmdir()


def test_root_in_a_container_cannot_name_itself_a_service(
        daemon: StartDaemon, programs: Path, children: list[subprocess.Popen[bytes]]) -> None:
    """Root in a container (here a chroot: a root directory other than the host's) can run
    any file it names sshd or slurmstepd. Such a process is no service of the node: its
    job is held like any other, so a pod cannot make itself impossible to hold."""
    contained = in_a_root_of_its_own(program(programs, "sshd"), programs / "root", "600")
    children.append(contained)
    eventually(lambda: os.readlink(f"/proc/{contained.pid}/exe").endswith("/sshd"))
    d = daemon(QUIET)
    job = d.register(name="pod-with-an-sshd", pid=contained.pid)
    assert d.call("POST", f"/v1/jobs/{job['id']}/pause").status_code == 200
    eventually(lambda: state(contained.pid) == "T", what="the contained sshd stopped")
    assert d.call("DELETE", f"/v1/jobs/{job['id']}").status_code == 204
