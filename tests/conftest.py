"""Fixtures shared by the suite: copies of the fixture trees, a daemon runner, a fake NVML."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.c_nvml import CNvmlState
from tests.support.daemon import DaemonProcess
from tests.support.processes import stop
from tests.support.terminal import Tmux, have_tmux
from tests.support.ttar import unpack

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def sys_tree(tmp_path: Path) -> Path:
    """A private copy of the fixture sysfs tree (tests/fixtures/sys.ttar) that a test may
    change. It is kept as a ttar archive, as node_exporter keeps its own, because the tree
    holds symlink loops, as the real /sys does, that trip tools walking the repository."""
    unpack(FIXTURES / "sys.ttar", tmp_path)
    return tmp_path / "sys"


@pytest.fixture
def proc_tree(tmp_path: Path) -> Path:
    dest = tmp_path / "proc"
    shutil.copytree(FIXTURES / "proc", dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def node_exporter_sys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """node_exporter's own sysfs capture, unpacked."""
    dest = tmp_path_factory.mktemp("node_exporter")
    unpack(FIXTURES / "node_exporter" / "sys.ttar", dest)
    return dest / "sys"


@pytest.fixture
def empty_sys(tmp_path: Path) -> Path:
    dest = tmp_path / "empty_sys"
    dest.mkdir()
    return dest


@pytest.fixture
def c_nvml(tmp_path: Path) -> CNvmlState:
    """The C fake NVML (tests/support/c_nvml.py), built once; skips the test without gcc."""
    return CNvmlState(tmp_path / "nvml.state")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Starts daemons for a test and stops them afterwards, whatever happens."""
    started: list[DaemonProcess] = []

    def start(config: dict[str, Any], wait: bool = True, **kwargs: Any) -> DaemonProcess:
        workdir = tmp_path / f"daemon{len(started)}"
        workdir.mkdir()
        process = DaemonProcess(workdir, config, **kwargs)
        started.append(process)
        return process.start(wait=wait)

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def terminal() -> Iterator[Tmux]:
    """A tmux server of the test's own (its socket under /tmp: a socket's path is short),
    killed afterwards with every session it still has."""
    if not have_tmux():
        pytest.skip("tmux is not installed")
    directory = Path(tempfile.mkdtemp(prefix="governor-tmux-"))
    tmux = Tmux(directory / "socket")
    yield tmux
    tmux.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _remove_empty_governor_cgroups() -> Iterator[None]:
    """Tests kill daemons with -9, which cannot remove the cgroups they made; once the
    test children are gone those are empty, and this leaves the machine as it was."""
    yield
    for directory in Path("/sys/fs/cgroup").glob("*/governor-*"):
        with contextlib.suppress(OSError):
            directory.rmdir()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        stop(child)


@pytest.fixture
def launched() -> Iterator[list[subprocess.Popen[bytes]]]:
    """`governor launch` processes a test starts; each is asked to stop (so it releases
    and unregisters its job) and killed if it will not."""
    launchers: list[subprocess.Popen[bytes]] = []
    yield launchers
    for launcher in launchers:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(15)
            except subprocess.TimeoutExpired:
                launcher.kill()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose paths fit a unix socket's 108 bytes, which pytest's may not."""
    path = Path(tempfile.mkdtemp(prefix="gov-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
