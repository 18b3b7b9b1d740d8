"""governor/host: the parsers of /proc/PID/stat and mountinfo, on texts the kernel writes
and on this machine's own processes."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pynvml
import pytest

from governor.host import cgroupfs, nvml, procfs

#: a command holding spaces and parentheses, as prctl(PR_SET_NAME) allows
STAT = (b"4242 (a) b (c)) S 4000 4242 4242 0 -1 4194560 100 0 0 0 "
        b"250 50 0 0 20 0 1 0 123456 1000000 100 18446744073709551615 1 1 0 0 0 0 0 0 0 "
        b"0 0 0 17 0 0 0 0 0 0")


def test_stat_is_split_after_the_last_parenthesis() -> None:
    stat = procfs.parse_stat(STAT)
    assert stat is not None
    assert (stat.state, stat.ppid, stat.cpu_ticks, stat.start_ticks) == (b"S", 4000, 300, 123456)
    assert not stat.is_kernel_thread
    assert stat.started_at == 123456 / procfs.CLOCK_TICKS + procfs.boot_time()
    text = procfs.parse_stat(STAT.decode())
    assert text is not None and text.cpu_ticks == 300


@pytest.mark.parametrize("data", [b"", b"4242 (cut", b"4242 (short) S 1 2"])
def test_a_stat_that_is_not_one_is_none(data: bytes) -> None:
    assert procfs.parse_stat(data) is None


def test_a_stat_with_garbage_fails_when_read() -> None:
    stat = procfs.parse_stat(b"1 (x) " + b"z " * 30)
    assert stat is not None
    with pytest.raises(ValueError):
        _ = stat.cpu_ticks


def test_stat_of_this_process_agrees_with_psutil() -> None:
    stat = procfs.read_stat(os.getpid())
    assert stat is not None
    assert stat.ppid == os.getppid()
    # psutil reads the boot time afresh each call, procfs once: it moves by whole seconds
    # when the wall clock is adjusted, so compare the times since boot
    since_boot = psutil.Process().create_time() - psutil.boot_time()
    assert stat.started_at - procfs.boot_time() == pytest.approx(since_boot, abs=0.02)
    assert procfs.state(os.getpid()) == b"R"
    assert procfs.uid(os.getpid()) == os.getuid()
    assert os.getppid() in procfs.ancestors(os.getpid())


def test_kernel_threads_and_missing_processes() -> None:
    assert procfs.is_kernel_thread(2)
    assert not procfs.is_kernel_thread(os.getpid())
    gone = 2**22 + 1  # above pid_max's ceiling
    assert procfs.read_stat(gone) is None and procfs.state(gone) == b""
    assert procfs.uid(gone) is None


MOUNTINFO = """\
22 1 0:21 / /proc rw,nosuid - proc proc rw
30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate
31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw shared:5 - cgroup cgroup rw,cpu,cpuacct
32 25 0:28 /sub\\040dir /mnt/my\\040freezer rw - cgroup cgroup rw,freezer
33 25 0:29 / /broken rw
"""


def test_mountinfo_gives_the_hierarchies(tmp_path: Path) -> None:
    file = tmp_path / "mountinfo"
    file.write_text(MOUNTINFO)
    found = cgroupfs.find_hierarchies(file)
    assert found == {
        "v2": cgroupfs.Hierarchy("v2", Path("/sys/fs/cgroup"), "/"),
        "cpu": cgroupfs.Hierarchy("cpu", Path("/sys/fs/cgroup/cpu,cpuacct"), "/"),
        "cpuacct": cgroupfs.Hierarchy("cpuacct", Path("/sys/fs/cgroup/cpu,cpuacct"), "/"),
        "freezer": cgroupfs.Hierarchy("freezer", Path("/mnt/my freezer"), "/sub dir"),
    }
    assert found["freezer"].dir("/sub dir/job") == Path("/mnt/my freezer/job")
    assert cgroupfs.cgroup2_mount(file) == Path("/sys/fs/cgroup")
    assert cgroupfs.find_hierarchies(tmp_path / "missing") == {}
    assert cgroupfs.cgroup2_mount(tmp_path / "missing") is None


def test_a_process_cgroups(tmp_path: Path) -> None:
    file = tmp_path / "cgroup"
    file.write_text("4:cpu,cpuacct:/jobs\n1:freezer:/\n0::/user.slice/a b\n")
    assert cgroupfs.memberships(file) == {
        "cpu": "/jobs", "cpuacct": "/jobs", "freezer": "/", "v2": "/user.slice/a b"}
    assert cgroupfs.process_cgroups(2**22 + 1) == {}
    assert cgroupfs.process_cgroups(os.getpid()) == cgroupfs.memberships(
        Path("/proc/self/cgroup"))


def test_nvml_module_and_error_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    # The Python fake here because this checks GOVERNOR_NVML_MODULE itself, the hook that
    # loads it; the C fake is the real pynvml on a fake library and needs no hook.
    monkeypatch.setenv("GOVERNOR_NVML_MODULE", "tests.support.fake_nvml")
    module = nvml.load_module()
    assert module.__name__ == "tests.support.fake_nvml"
    assert nvml.error_code(ValueError()) == -1
    assert nvml.error_code(pynvml.NVMLLibraryMismatchError("no _v3")) == (
        nvml.ERROR_FUNCTION_NOT_FOUND), "pynvml's stand-in for FunctionNotFound"
    assert nvml.ERROR_GPU_IS_LOST in nvml.GPU_GONE
    assert nvml.ERROR_NOT_SUPPORTED in nvml.ABSENT
