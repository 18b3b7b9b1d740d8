"""`governor top`: the frame drawn from a status, the per-round polling, and the verb
against a real daemon whose job a hot sensor pauses."""

from __future__ import annotations

import contextlib
import io
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console, RenderableType
from rich.segment import Segment

from governor.cli import top
from governor.cli.status_model import Status
from governor.cli.top import KeyReader, StatusPoller, TerminalGone, live_top, render, run_live
from governor.client import ApiClient, ClientError
from governor.config import load_config
from tests.support.cli import governor
from tests.support.daemon import REPO, DaemonProcess, free_port, to_toml
from tests.support.processes import eventually, state
from tests.support.scenario import config, heat, spawn
from tests.support.terminal import Tmux, kill_marked, marked

SERIES = 'cpu_temperature_celsius{chip="platform_coretemp_0",sensor="Package id 0"}'
REASON = f"cpu-hot: {SERIES} = 95 (above 80)"
WHERE = "http://127.0.0.1:9474"
NOW = 1_700_000_000.0


def text(renderable: RenderableType, width: int = 200) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def fitted(status: dict[str, Any] | None, width: int, height: int, **kwargs: Any) -> str:
    """The frame a terminal of that size shows, as text, checked to fit it."""
    out = text(render(status, where=WHERE, width=width, height=height, **kwargs), width)
    lines = out.splitlines()
    assert len(lines) <= height, f"{len(lines)} lines for {height}:\n{out}"
    assert all(len(line.rstrip()) <= width for line in lines), out
    return out


def colours(renderable: RenderableType, word: str, width: int = 200) -> set[str]:
    """The colours the segments holding `word` are drawn in."""
    console = Console(width=width, file=io.StringIO(), force_terminal=True,
                      color_system="standard")
    found: set[str] = set()
    for segment in Segment.simplify(console.render(renderable)):
        if word in segment.text and segment.style is not None and segment.style.color:
            found.add(segment.style.color.name)
    return found


def line_with(output: str, *parts: str) -> str:
    """The one line that holds every part."""
    lines = [line for line in output.splitlines() if all(p in line for p in parts)]
    assert len(lines) == 1, f"{parts} on {len(lines)} lines of:\n{output}"
    return lines[0]


def rule_series(name: str, labels: dict[str, str], state: str, value: float | None, *,
                metric: str = "cpu_temperature_celsius", threshold: float = 80.0,
                clear: float = 70.0, action: str = "pause", **extra: Any) -> dict[str, Any]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"name": name, "series": f"{metric}{{{inner}}}", "labels": labels, "state": state,
            "clearing": False, "missing": False, "value": value, "since": NOW - 75,
            "action": action, "metric": metric, "direction": "above", "threshold": threshold,
            "clear_threshold": clear, **extra}


def job(job_id: str, name: str, state: str, speed: float, *reasons: str,
        **extra: Any) -> dict[str, Any]:
    return {"id": job_id, "name": name, "pid": 4242, "cgroup": None, "mode": "signal",
            "devices": [], "priority": 0, "state": state, "speed": speed,
            "reasons": list(reasons), "held_by_operator": False, **extra}


def reading(metric: str, value: float, **labels: str) -> dict[str, Any]:
    return {"metric": metric, "labels": labels, "value": value}


def sampler(name: str, state: str = "ok", error: str | None = None,
            problems: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"name": name, "state": state, "up": state == "ok", "duration_seconds": 0.001,
            "error": error, "problems": list(problems), "last_success": NOW,
            "consecutive_failures": 0, "retry_at": None}


def hand_made() -> dict[str, Any]:
    package = {"chip": "platform_coretemp_0", "sensor": "Package id 0"}
    return {
        "sequence": 1234, "taken_at": NOW,
        "samplers": [
            sampler("cpu"), sampler("hwmon", problems=("temp3_input: unreadable",)),
            sampler("nvml", "unavailable", "NVML Shared Library Not Found"),
            sampler("amdgpu", "error", "timed out after 0.8 s"),
        ],
        "readings": [
            reading("cpu_utilization_ratio", 0.25, cpu="0"),
            reading("cpu_utilization_ratio", 0.75, cpu="1"),
            reading("memory_used_ratio", 0.5),
            reading("pressure_stall_ratio", 0.125, resource="cpu", kind="some"),
            reading("cpu_temperature_celsius", 95.0, **package),
            reading("gpu_info", 1, gpu="0", uuid="GPU-0", name="NVIDIA H100"),
            reading("gpu_temperature_celsius", 88.0, gpu="0"),
            reading("gpu_utilization_ratio", 0.9, gpu="0"),
            reading("gpu_power_watts", 290.0, gpu="0"),
            reading("gpu_power_limit_watts", 300.0, gpu="0"),
            reading("gpu_clock_event_active", 1, gpu="0", reason="sw_power_cap"),
        ],
        "rules": [
            rule_series("cpu-hot", package, "tripped", 95.0),
            rule_series("gpu-warm", {"gpu": "0"}, "pending", 88.0,
                        metric="gpu_temperature_celsius", threshold=85.0, clear=80.0,
                        action="slow"),
            rule_series("gpu-warm", {"gpu": "1"}, "ok", None, metric="gpu_temperature_celsius",
                        threshold=85.0, clear=80.0, action="slow", missing=True),
            {"name": "npu-hot", "series": None, "labels": {}, "state": "ok",
             "clearing": False, "missing": False, "value": None, "since": None,
             "action": "pause", "metric": "accelerator_temperature_celsius",
             "direction": "above", "threshold": 90.0, "clear_threshold": 85.0},
        ],
        "jobs": [
            job("aaaa0001", "trainer", "paused", 0.0, REASON),
            job("aaaa0002", "tuner", "slowed", 0.5, "gpu-warm: slow"),
            job("aaaa0003", "search", "running", 1.0),
            job("aaaa0004", "held", "paused", 0.0, "operator", held_by_operator=True),
            job("aaaa0005", "ended", "gone", 1.0),
        ],
        "power_caps": {"0": 250.0},
        "audit": {"path": "/var/lib/governor/audit.jsonl", "ok": True, "errors": 0},
    }


# ---- the frame -------------------------------------------------------------------


def test_the_frame_shows_header_readings_rules_and_jobs() -> None:
    frame = render(hand_made(), where=WHERE)
    out = text(frame)
    assert line_with(out, "governor top", WHERE, "round 1234")
    samplers = line_with(out, "samplers:")
    assert "cpu ok" in samplers and "nvml unavailable (NVML Shared Library Not Found)" in samplers
    assert "amdgpu error (timed out after 0.8 s)" in samplers
    assert line_with(out, "hwmon: temp3_input: unreadable")

    line_with(out, "cpu-hot", "chip=platform_coretemp_0, sensor=Package id 0", "95.0 °C",
              "> 80.0 °C", "< 70.0 °C", "tripped for 1m15s")
    line_with(out, "gpu-warm", "gpu=0", "88.0 °C", "> 85.0 °C", "pending for 1m15s")
    line_with(out, "gpu-warm", "gpu=1", "missing", "> 85.0 °C", "ok missing")
    line_with(out, "cpu-hot", "cpu_temperature_celsius", "pause", "tripped", "1 tripped")
    line_with(out, "gpu-warm", "slow", "pending", "1 pending, 1 ok, 1 missing")
    line_with(out, "npu-hot", "accelerator_temperature_celsius", "no series yet")

    line_with(out, "aaaa0001", "trainer", "paused", "0%", REASON)
    line_with(out, "aaaa0002", "tuner", "slowed", "50%", "gpu-warm: slow")
    line_with(out, "aaaa0003", "search", "running", "100%")
    line_with(out, "aaaa0004", "paused (operator)", "operator")
    line_with(out, "aaaa0005", "gone")

    line_with(out, "NVIDIA H100", "88 °C (trips >85.0 °C)", "90%", "290 / 300 W",
              "capped at 250 W", "sw_power_cap")
    line_with(out, "cpu", "50.0% average over 2 cores, busiest cpu1 75.0%")
    line_with(out, "memory", "50.0% used")
    line_with(out, "pressure", "cpu some 12.5%")
    line_with(out, "CPU temp", "platform_coretemp_0: Package id 0 95.0 °C (trips >80.0 °C)")


def test_states_are_coloured() -> None:
    frame = render(hand_made(), where=WHERE)
    assert colours(frame, "running") == {"green"}
    assert colours(frame, "slowed") == {"yellow"}
    assert colours(frame, "paused") == {"red"}
    assert colours(frame, "tripped") == {"red"}
    assert colours(frame, "pending") == {"yellow"}
    assert colours(frame, "95.0 °C") == {"red"}, "a reading a tripped rule watches is red"
    assert colours(frame, "amdgpu error") == {"red"}


def test_no_rules_no_jobs_no_round_yet() -> None:
    out = text(render({"samplers": [], "readings": [], "rules": [], "jobs": []}, where=WHERE))
    assert "no sampling round yet" in out
    assert "Rules: none configured" in out and "Jobs: none registered" in out


def test_unreachable_daemon_is_shown_with_the_last_status() -> None:
    error = f"cannot reach the governor at {WHERE} (is `governor run` running?)"
    alone = text(render(None, where=WHERE, error=error))
    assert f"{error}; retrying" in alone and "Jobs" not in alone
    stale = text(render(hand_made(), where=WHERE, error=error))
    assert "retrying (showing the last status it sent)" in stale
    assert "round 1234" in stale and "aaaa0001" in stale


def test_power_cap_rule_that_cannot_be_enforced() -> None:
    status = hand_made()
    status["rules"] = [rule_series("gpu-cap", {"gpu": "0"}, "tripped", 88.0,
                                   metric="gpu_temperature_celsius", action="power_cap",
                                   enforceable=False,
                                   not_enforceable_because="setting a power limit needs root")]
    out = text(render(status, where=WHERE))
    line_with(out, "gpu-cap", "power_cap", "not enforceable: setting a power limit needs root")


def test_a_hold_rule_shows_its_target_reading_and_output() -> None:
    status = hand_made()
    hold = {"direction": None, "threshold": None, "clear_threshold": None, "target": 80.0,
            "via": "speed"}
    status["rules"] = [
        rule_series("gpu-hold", {"gpu": "0"}, "ok", 88.0, metric="gpu_temperature_celsius",
                    action="hold", **{**hold, "output": 0.83}),
        rule_series("gpu-hold", {"gpu": "1"}, "ok", 60.0, metric="gpu_temperature_celsius",
                    action="hold", **{**hold, "output": 1.0})]
    out = text(render(status, where=WHERE))
    line_with(out, "gpu-hold", "gpu=0", "88.0 °C", "= 80.0 °C", "output 0.83", "ok holding")
    line_with(out, "gpu-hold", "gpu=1", "60.0 °C", "= 80.0 °C", "output 1.00")
    line_with(out, "gpu-hold", "hold at 80", "1 holding back")
    line_with(out, "NVIDIA H100", "88 °C (held at 80.0 °C)")


def a_big_node() -> dict[str, Any]:
    """hand_made, on a node with 16 GPUs, 4 accelerators, 2 CPU chips of 64 sensors and
    12 more jobs, so that no frame of a usual terminal holds it all."""
    status = hand_made()
    readings = status["readings"]
    for gpu in range(1, 16):
        labels = {"gpu": str(gpu)}
        readings += [reading("gpu_info", 1, **labels, uuid=f"GPU-{gpu}", name="NVIDIA H100"),
                     reading("gpu_temperature_celsius", 40.0 + gpu, **labels),
                     reading("gpu_utilization_ratio", 0.5, **labels),
                     reading("gpu_power_watts", 200.0, **labels),
                     reading("gpu_power_limit_watts", 700.0, **labels)]
    for device in range(4):
        for sensor in ("edge", "junction", "mem"):
            readings.append(reading("accelerator_temperature_celsius", 50.0 + device,
                                    device=f"card{device}", driver="amdgpu", sensor=sensor))
    for chip in range(2):
        for core in range(64):
            readings.append(reading("cpu_temperature_celsius", 40.0 + core % 20 + chip,
                                    chip=f"platform_coretemp_{chip + 1}", sensor=f"Core {core}"))
    status["jobs"] += [job(f"bbbb{i:04d}", f"sweep-{i}", "running", 1.0) for i in range(12)]
    return status


@pytest.mark.parametrize("size", [(80, 24), (100, 30)])
def test_a_terminal_frame_fits_it_and_shows_the_held_jobs_first(size: tuple[int, int]) -> None:
    width, height = size
    out = fitted(a_big_node(), width, height)
    first = out.splitlines()[0]
    assert "jobs 17: 2 paused, 1 slowed" in first and "rules 3: 1 tripped, 1 pending" in first
    line_with(out, "aaaa0001", "trainer", "paused", "0%", "cpu-hot:")
    line_with(out, "aaaa0002", "tuner", "slowed", "50%", "gpu-warm: slow")
    line_with(out, "aaaa0004", "held", "paused (operator)", "operator")
    line_with(out, "cpu-hot", "95.0 °C", "> 80.0 °C", "tripped")
    line_with(out, "gpu-warm", "gpu=0", "pending")
    if "more jobs" in out:
        line_with(out, "… and", "more jobs", "running")


def test_a_job_resumed_outside_governor_is_shown_running_among_the_held_jobs() -> None:
    """An administrator resumed a job a rule pauses: top says it runs, and why that is
    news, first among the jobs of a crowded node and in the summary."""
    status = a_big_node()
    status["jobs"].append(job("cccc0001", "fought", "running", 1.0, REASON,
                              outside="resumed", source="slurm", scheduler_id="42"))
    out = fitted(status, 100, 30)
    assert "jobs 18: 2 paused, 1 slowed, 1 resumed outside governor" in out.splitlines()[0]
    line_with(out, "cccc0001", "running (resumed outside governor)", "100%", "cpu-hot:")
    frame = render(status, where=WHERE, width=200)
    assert colours(frame, "(resumed outside governor)") == {"yellow"}


def test_a_frame_with_room_left_shows_the_hottest_readings_and_counts_the_rest() -> None:
    out = fitted(a_big_node(), 100, 36)
    line_with(out, "bbbb0011", "sweep-11", "running")
    line_with(out, "cpu-hot", "95.0 °C", "tripped")
    rows = [int(line.split()[0]) for line in out.splitlines()
            if line[:1].isdigit() and " W " in line]
    hidden = int(line_with(out, "… and", "more GPUs").split()[2])
    assert len(rows) > 1 and hidden + len(rows) == 16
    assert rows == sorted(rows), "the GPUs kept are drawn in their own order"
    assert rows[:2] == [0, 16 - len(rows) + 1], "the hottest kept: gpu0 (88 °C), then 15, 14..."
    line_with(out, f"more GPUs (the hottest at {40 + 16 - len(rows)} °C)")


def test_only_the_hottest_cpu_sensors_then_a_count() -> None:
    out = fitted(a_big_node(), 100, 80)
    chip = line_with(out, "platform_coretemp_2:")
    temperatures = [float(t) for t in re.findall(r"Core \d+ ([\d.]+) °C", chip)]
    assert temperatures[0] == 60.0 and temperatures == sorted(temperatures, reverse=True)
    assert chip.rstrip().endswith(f"+{64 - len(temperatures)} more")
    assert "Package id 0 95.0 °C" in line_with(out, "CPU temp", "platform_coretemp_0:")


def test_without_a_height_everything_is_printed() -> None:
    out = text(render(a_big_node(), where=WHERE, width=2000), 2000)
    assert "… and" not in out
    assert all(f"Core {core} " in out for core in range(64))
    assert len([line for line in out.splitlines() if "NVIDIA H100" in line]) == 16
    line_with(out, "bbbb0011", "sweep-11", "4242", "signal", "running", "100%")


def test_the_summary_gives_way_piece_by_piece() -> None:
    wide = fitted(hand_made(), 200, 40).splitlines()[0]
    assert wide.startswith("governor top  round 1234 at ")
    assert "samplers 2/4 ok, amdgpu error" in wide and WHERE in wide
    narrow = fitted(hand_made(), 60, 40).splitlines()[0]
    assert "governor top" not in narrow and WHERE not in narrow
    assert "jobs 5: 2 paused, 1 slowed" in narrow and "rules 3: 1 tripped" in narrow


def test_a_fetch_error_stays_on_screen() -> None:
    error = f"cannot reach the governor at {WHERE} (is `governor run` running?)"
    out = fitted(a_big_node(), 80, 24, error=error)
    assert "retrying (showing the last status it sent)" in out
    line_with(out, "aaaa0001", "trainer", "paused")
    assert fitted(None, 80, 24, error=error).count("retrying") == 1


@pytest.mark.parametrize("size", [(40, 10), (20, 3), (1, 1)])
def test_tiny_terminals_get_what_fits(size: tuple[int, int]) -> None:
    fitted(a_big_node(), *size)


@pytest.mark.parametrize("width", [40, 80, 100, 180])
def test_the_lines_a_part_is_told_to_take_are_the_lines_it_draws(width: int) -> None:
    """Fitting counts the lines of one-line rows instead of drawing them: the counts
    must be right, or the bottom of the frame would be cut."""
    status = Status.parse(a_big_node())
    frame = top._Frame(width, fitted=True)
    parts = [top._problems(status, frame), top._series(status, frame),
             top._gpus(status, frame), top._accelerators(status, frame),
             top._host(status, frame), top._rules(status, frame),
             top._paragraph(top.TIER_REST, top._samplers(status), frame)]
    for part in parts:
        for count in range(len(part.rows) + 1):
            assert part.height(count) == len(frame.lines(part.draw(count)))


def test_a_job_name_is_not_markup() -> None:
    status = hand_made()
    status["jobs"] = [job("aaaa0009", "sweep[/bold] [lr=0.1]", "running", 1.0)]
    line_with(fitted(status, 80, 24), "aaaa0009", "sweep[/bold] [lr=0.1]", "running")


# ---- polling once a round --------------------------------------------------------


class FakeDaemon:
    """Answers with a scripted series of statuses (or errors), one per fetch."""

    def __init__(self, script: list[int | str], interval: float = 1.0):
        self.script = list(script)
        self.interval = interval
        self.clock = NOW
        self.fetches = 0

    def fetch(self) -> Mapping[str, Any]:
        self.fetches += 1
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, str):
            raise ClientError(step)
        status = hand_made()
        status["sequence"], status["taken_at"] = step, NOW + (step - 1) * self.interval
        status["samplers"][0]["duration_seconds"] = 0.2
        return status

    def wall(self) -> float:
        return self.clock


def test_poller_asks_just_after_the_next_round_is_due() -> None:
    fake = FakeDaemon([1])
    poller = StatusPoller(fake.fetch, 1.0, wall=fake.wall)
    assert poller.delay() == 1.0, "nothing fetched yet: once an interval"
    fake.clock = NOW + 0.3
    assert poller.poll() is True
    assert poller.delay() == pytest.approx(0.95), (
        "round 2 starts at NOW + 1 and is out when its samplers are done, as round 1's were")
    fake.clock = NOW + 1.22
    assert poller.poll() is False, "round 1 again: nothing to draw"
    assert poller.delay() == pytest.approx(0.1), "round 2 is a little late: ask again soon"
    fake.clock = NOW + 30
    assert poller.delay() == 1.0, "the daemon is stalled (or its clock differs): every interval"
    fake.clock = NOW - 3600
    assert poller.delay() == 1.0


def test_the_live_loop_draws_a_frame_for_each_new_round_and_each_outage() -> None:
    fake = FakeDaemon([1, 1, 2, "cannot reach the governor", "cannot reach the governor", 2, 3])
    poller = StatusPoller(fake.fetch, 1.0, wall=fake.wall)
    frames: list[str] = []
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        fake.clock += seconds
        return False

    drawn = run_live(poller, lambda frame: frames.append(text(frame)), wait, where=WHERE,
                     max_frames=5)
    assert drawn == 5 and fake.fetches == 7
    assert ["round 1 " in frames[0], "round 2 " in frames[1]] == [True, True]
    assert "cannot reach the governor; retrying" in frames[2] and "round 2 " in frames[2]
    assert "retrying" not in frames[3] and "round 2 " in frames[3]
    assert "round 3 " in frames[4]
    assert len(waits) == 6 and all(0 < w <= 1.0 for w in waits)


def test_a_quit_key_ends_the_loop() -> None:
    fake = FakeDaemon([1, 2, 3])
    poller = StatusPoller(fake.fetch, 1.0, wall=fake.wall)
    frames: list[RenderableType] = []
    assert run_live(poller, frames.append, lambda _: True, where=WHERE) == 1


def test_live_view_without_a_terminal_prints_each_frame() -> None:
    fake = FakeDaemon([1, 2, 3])
    poller = StatusPoller(fake.fetch, 0.01, wall=fake.wall)
    out = io.StringIO()
    console = Console(file=out, width=200)
    assert not console.is_terminal
    assert live_top(poller, console, where=WHERE, max_frames=3,
                    keys=KeyReader(io.StringIO())) == 3
    printed = out.getvalue()
    assert [f"round {n} " in printed for n in (1, 2, 3)] == [True, True, True]


@pytest.fixture
def pty_stream() -> Iterator[tuple[int, Any]]:
    main, follower = os.openpty()
    stream = os.fdopen(follower, "r")
    yield main, stream
    stream.close()
    with contextlib.suppress(OSError):  # a test may have hung it up already
        os.close(main)


def test_q_on_a_terminal_quits_and_the_terminal_is_restored(
        pty_stream: tuple[int, Any]) -> None:
    import termios

    main, stream = pty_stream
    before = termios.tcgetattr(stream.fileno())
    with KeyReader(stream) as keys:
        assert not termios.tcgetattr(stream.fileno())[3] & termios.ICANON, "cbreak mode"
        assert keys.wait(0.05) is False
        os.write(main, b"x")
        assert keys.wait(0.05) is False, "other keys do nothing"
        os.write(main, b"q")
        assert keys.wait(5.0) is True
    assert termios.tcgetattr(stream.fileno()) == before


def test_a_hung_up_terminal_ends_the_key_reader(pty_stream: tuple[int, Any]) -> None:
    """Once its other side is closed a terminal reads as end of input, at once and for
    ever: the reader ends rather than spin on it until the timeout."""
    main, stream = pty_stream
    with KeyReader(stream) as keys:
        os.close(main)
        with pytest.raises(TerminalGone):
            keys.wait(10.0)


def test_the_live_view_ends_when_its_terminal_hangs_up() -> None:
    """The screen it draws on hangs up between two rounds (the keys come from elsewhere):
    the next frame finds no terminal and the view ends."""
    main, follower = os.openpty()
    screen = os.fdopen(follower, "w", encoding="utf-8")
    drained: list[bytes] = []
    hung_up = threading.Event()

    def drain() -> None:  # what a terminal would show; a full pty would block the writer
        while not hung_up.is_set():
            if select.select([main], [], [], 0.05)[0]:
                drained.append(os.read(main, 65536))
        os.close(main)

    reader = threading.Thread(target=drain)
    reader.start()
    fake = FakeDaemon([1, 2, 3])

    def fetch() -> Mapping[str, Any]:
        if fake.fetches == 1:
            hung_up.set()
            reader.join()
        return fake.fetch()

    try:
        console = Console(file=screen, width=80, height=24)
        assert console.is_terminal
        with pytest.raises(TerminalGone):
            live_top(StatusPoller(fetch, 0.01, wall=fake.wall), console, where=WHERE,
                     keys=KeyReader(io.StringIO()))
        assert b"round 1 " in b"".join(drained)
    finally:
        hung_up.set()
        reader.join()
        with contextlib.suppress(OSError):
            screen.close()


# ---- the verb, against a real daemon ---------------------------------------------


def paused_trainer(daemon: Callable[..., DaemonProcess], sys_tree: Path, proc_tree: Path,
                   children: list[subprocess.Popen[bytes]]) -> tuple[
                       DaemonProcess, int, dict[str, Any]]:
    """A daemon whose hot package sensor has paused a busy job named trainer."""
    d = daemon(config(sys_tree, proc_tree, sources={"nvml": "off"}))
    pid = spawn(children)
    registered = d.register(name="trainer", pid=pid)
    heat(sys_tree, 95)
    eventually(lambda: state(pid) == "T", what="the job is stopped")
    eventually(lambda: d.job(registered["id"])["state"] == "paused")
    return d, pid, registered


def test_top_once_shows_the_paused_job_and_the_tripped_rule(
        daemon: Callable[..., DaemonProcess], sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    d, pid, registered = paused_trainer(daemon, sys_tree, proc_tree, children)

    result = governor("top", "--once", "--config", str(d.config_path),
                      env={"COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert line_with(out, "governor top", d.url, "round ")
    line_with(out, registered["id"], "trainer", str(pid), "signal", "paused", "0%", REASON)
    line_with(out, "cpu-hot", "sensor=Package id 0", "95.0 °C", "> 80.0 °C", "< 70.0 °C",
              "tripped")
    line_with(out, "cpu-hot", "cpu_temperature_celsius", "pause", "tripped", "1 tripped")
    assert "\x1b[" not in out, "no colour codes into a pipe"

    # the live loop, in process: each frame a newer round than the last
    with ApiClient(load_config(d.config_path).api.client_settings()) as client:
        poller = StatusPoller(client.status, 0.1)
        seen: list[int] = []

        def show(_: RenderableType) -> None:
            assert poller.status is not None
            seen.append(int(poller.status["sequence"]))

        def sleep(seconds: float) -> bool:
            time.sleep(seconds)
            return False

        assert run_live(poller, show, sleep, where=client.where, max_frames=4) == 4
    assert seen == sorted(set(seen)), f"a round drawn twice, or out of order: {seen}"


def test_top_on_a_terminal_of_80x24_shows_the_job_and_ends_with_the_terminal(
        daemon: Callable[..., DaemonProcess], sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]], terminal: Tmux) -> None:
    """`governor top` in a real terminal (a tmux pane) of 80x24: the paused job's row is
    on the screen. Closing the terminal hangs it up, and top ends."""
    d, _, registered = paused_trainer(daemon, sys_tree, proc_tree, children)

    mark = f"GOVERNOR_TOP_TEST_{os.getpid()}"
    try:
        terminal.start("top", [sys.executable, "-m", "governor", "top", "--config",
                               str(d.config_path)],
                       width=80, height=24, cwd=REPO, env={mark: "1", "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 30
        while not re.search(rf"{registered['id']}\s+trainer\s+paused\s+0%",
                            screen := terminal.screen("top")):
            assert time.monotonic() < deadline, f"no job row on the screen:\n{screen}"
            time.sleep(0.1)
        assert "jobs 1: 1 paused" in screen.splitlines()[0], screen
        line_with(screen, registered["id"], "trainer", "paused", "0%", "cpu-hot:")
        line_with(screen, "cpu-hot", "95.0 °C", "tripped")
        assert len(marked(mark)) == 1, "env execs top: one process"

        terminal.close("top")
        deadline = time.monotonic() + 10
        while left := marked(mark):
            assert time.monotonic() < deadline, (
                f"top outlived its terminal: {[(p.pid, p.status()) for p in left]}")
            time.sleep(0.05)
    finally:
        kill_marked(mark)


def test_top_once_without_a_daemon_exits_1_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "governor.toml"
    port = free_port()
    config.write_text(to_toml({"api": {"listen": f"127.0.0.1:{port}",
                                       "token_file": str(tmp_path / "token")}}))
    result = governor("top", "--once", "--config", str(config))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        f"governor: cannot reach the governor at http://127.0.0.1:{port}")


def test_top_help_and_bad_usage() -> None:
    assert governor("top", "--help").stdout.startswith("usage: governor top")
    bad = governor("top", "--interval", "0")
    assert bad.returncode == 2 and "must be more than 0" in bad.stderr
