"""CPU sampler: /proc/stat deltas, meminfo, loadavg and PSI under a fixture procfs root."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from governor.sampling.cpu import (
    CpuSampler,
    advance,
    parse_meminfo,
    parse_pressure,
    parse_proc_stat,
    utilization,
)
from governor.sampling.paths import SysPaths


def values(result: object, metric: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {r.labels: r.value for r in result.readings if r.metric == metric}  # type: ignore[attr-defined]


def test_utilization_between_two_reads() -> None:
    before = parse_proc_stat("cpu  0 0 0 0\ncpu0 100 0 0 900 0 0 0 0\ncpu1 0 0 0 1000 0\n")
    # cpu0: 50 busy of 100 jiffies; cpu1: 100 iowait counts as idle
    after = parse_proc_stat("cpu  0 0 0 0\ncpu0 140 0 10 950 0 0 0 0\ncpu1 0 0 0 1000 100\n")
    assert utilization(before, after) == {"0": 0.5, "1": 0.0}


def test_steal_and_irq_are_busy_time() -> None:
    before = parse_proc_stat("cpu0 0 0 0 0 0 0 0 0\n")
    after = parse_proc_stat("cpu0 10 0 0 60 0 10 10 10\n")
    assert utilization(before, after) == {"0": pytest.approx(0.4)}


def test_a_core_without_elapsed_time_keeps_its_last_ratio() -> None:
    """Two reads inside one tick: the core still has a reading, or its series would blink."""
    stat = parse_proc_stat("cpu0 1 2 3 4\ncpu1 5 0 0 5\n")
    assert utilization(stat, stat, {"0": 0.25, "1": 0.75}) == {"0": 0.25, "1": 0.75}


def test_before_any_ratio_a_core_without_elapsed_time_has_its_average_since_boot() -> None:
    stat = parse_proc_stat("cpu0 1 2 3 4\n")
    assert utilization(stat, stat) == {"0": pytest.approx(0.6)}
    assert utilization({}, stat) == {"0": pytest.approx(0.6)}, "a core just brought online"


def test_a_core_whose_time_stood_still_keeps_its_window_start() -> None:
    """The next window is measured from the older read, so it is long enough to count."""
    first = parse_proc_stat("cpu0 0 0 0 100\ncpu1 0 0 0 100\n")
    same_tick = parse_proc_stat("cpu0 50 0 0 150\ncpu1 0 0 0 100\n")
    start = advance(first, same_tick)
    assert start == {"0": same_tick["0"], "1": first["1"]}
    later = parse_proc_stat("cpu0 50 0 0 250\ncpu1 30 0 0 170\n")
    assert utilization(start, later) == {"0": 0.0, "1": pytest.approx(0.3)}


def test_meminfo_uses_memavailable() -> None:
    assert parse_meminfo("MemTotal: 1000 kB\nMemAvailable: 250 kB\n") == 0.75


def test_meminfo_before_memavailable_existed() -> None:
    text = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 100 kB\nCached: 300 kB\n"
    assert parse_meminfo(text) == pytest.approx(0.5)


def test_pressure_avg10_as_ratio() -> None:
    text = "some avg10=12.50 avg60=1 avg300=0 total=5\nfull avg10=0.10 avg60=0 avg300=0 total=1\n"
    assert parse_pressure(text) == {"some": 0.125, "full": pytest.approx(0.001)}


CPU1_SINCE_BOOT = 150 / 925  # busy / total jiffies of its fixture line


def test_sampler_on_fixture_procfs(proc_tree: Path) -> None:
    sampler = CpuSampler(SysPaths("/nonexistent", proc_tree))
    stat = proc_tree / "stat"
    stat.write_text(stat.read_text().replace("cpu0 100 0 50 750 25", "cpu0 175 0 75 800 25"))
    result = sampler.sample()
    util = values(result, "cpu_utilization_ratio")
    assert util[(("cpu", "0"),)] == pytest.approx(100 / 150)
    # no time elapsed on cpu1 between the two reads: its average since boot
    assert util[(("cpu", "1"),)] == pytest.approx(CPU1_SINCE_BOOT)
    assert values(result, "memory_used_ratio") == {(): 0.25}
    assert values(result, "load_average_tasks") == {
        (("window", "1m"),): 0.52, (("window", "5m"),): 0.40, (("window", "15m"),): 0.31}
    psi = values(result, "pressure_stall_ratio")
    assert psi[(("resource", "cpu"), ("kind", "some"))] == pytest.approx(0.015)
    assert psi[(("resource", "io"), ("kind", "full"))] == pytest.approx(0.02)
    assert len(psi) == 6


def test_no_psi_means_no_series_not_a_failure(proc_tree: Path) -> None:
    for f in (proc_tree / "pressure").iterdir():
        f.unlink()
    result = CpuSampler(SysPaths("/nonexistent", proc_tree)).sample()
    assert values(result, "pressure_stall_ratio") == {}
    assert result.problems == []


def test_unreadable_stat_fails_the_sampler(tmp_path: Path) -> None:
    sampler = CpuSampler(SysPaths("/nonexistent", tmp_path))
    with pytest.raises(OSError):
        sampler.sample()


def test_real_procfs() -> None:
    sampler = CpuSampler(SysPaths("/sys", "/proc"))
    time.sleep(0.2)  # let the kernel's tick counters move
    result = sampler.sample()
    util = values(result, "cpu_utilization_ratio")
    assert util and all(0.0 <= v <= 1.0 for v in util.values())
    (used,) = values(result, "memory_used_ratio").values()
    assert 0.0 < used < 1.0


def test_real_procfs_sampled_at_once_has_every_core() -> None:
    """A round right after start reads /proc/stat twice inside one tick: every online core
    still has its reading, as it has in every later round."""
    cores = {line.split()[0].removeprefix("cpu")
             for line in Path("/proc/stat").read_text().splitlines()
             if line.startswith("cpu") and line[3].isdigit()}
    for _ in range(50):
        sampler = CpuSampler(SysPaths("/sys", "/proc"))
        first, second = ({dict(labels)["cpu"]
                          for labels in values(sampler.sample(), "cpu_utilization_ratio")}
                         for _ in range(2))
        sampler.close()
        assert first == second == cores


def test_a_counter_that_went_back_starts_a_new_window() -> None:
    """A core taken offline and back between two reads: its counters restart lower. It
    keeps its last ratio for that round, and the next window is measured from the new
    counters, not from the old, larger ones (which would freeze it for days)."""
    before = parse_proc_stat("cpu0 5000 0 0 5000\n")
    reset = parse_proc_stat("cpu0 100 0 0 900\n")
    assert utilization(before, reset, {"0": 0.5}) == {"0": 0.5}
    start = advance(before, reset)
    assert start == reset
    assert utilization(start, parse_proc_stat("cpu0 130 0 0 970\n")) == {
        "0": pytest.approx(0.3)}
