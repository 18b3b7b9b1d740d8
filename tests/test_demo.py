"""`make demo`, headless: the demo's daemon config and scenario, its two example jobs
launched as `make demo` launches them, and the whole loop checked.

The demo's rules and thermal model run three times faster here (the heat and cool rates
tripled, the rules' `for` and `clear_for` cut to a third, rounds of 0.2 s): the
temperatures follow the same curve in a third of the time. The test watches the daemon
(its readings through /v1/status, its actions through the audit log) until each job has
been slowed, paused and resumed, and reads the cooperative job's trace: no hold landed
inside one of its checkpoint writes.

`make demo` itself runs in a real terminal (tmux) of 80x24: the jobs show on its screen,
and closing the terminal stops every process it started, and leaves no job held.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from governor.config import parse_duration
from tests.support.coop import Worker
from tests.support.daemon import REPO, DaemonProcess, toml_value
from tests.support.terminal import Tmux, kill_marked, marked

StartDaemon = Callable[..., DaemonProcess]
SPEED_UP = 3.0
JOBS = {"coop-search": ("cooperative", "gpu0", "examples/coop_search.py"),
        "plain-search": ("signal", "gpu1", "examples/plain_search.py")}


def demo_config(tmp_path: Path, speed_up: float = SPEED_UP) -> dict[str, Any]:
    """config/demo/governor.toml with its scenario, sped up (1: as `make demo` runs), and
    the daemon's own files in tmp_path."""
    config = tomllib.loads((REPO / "config/demo/governor.toml").read_text())
    scenario = tomllib.loads((REPO / "config/demo/scenario.toml").read_text())
    lines = []
    for gpu in scenario["gpu"]:
        gpu["heat"] *= speed_up
        gpu["cool"] *= speed_up
        lines += ["[[gpu]]"] + [f"{k} = {toml_value(v)}" for k, v in gpu.items()] + [""]
    (tmp_path / "scenario.toml").write_text("\n".join(lines))
    config["sources"]["simulate"] = str(tmp_path / "scenario.toml")
    config["daemon"] = {"interval": 0.2 if speed_up > 1 else config["daemon"]["interval"]}
    config["api"] = {}
    for rule in config["rules"]:
        for key in ("for", "clear_for"):
            rule[key] = parse_duration(rule.get(key, 0)) / speed_up
    return config


def launch(d: DaemonProcess, name: str, trace: Path) -> subprocess.Popen[bytes]:
    mode, device, script = JOBS[name]
    with open(trace.with_suffix(".log"), "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "governor", "launch", "--config", str(d.config_path),
             "--name", name, "--mode", mode, "--device", device, "--",
             sys.executable, script, "--trace", str(trace), "--checkpoint-every", "10",
             "--verify-rounds", "4", "--checkpoint", str(trace.with_suffix(".json"))],
            cwd=REPO, env={**d.env, "GOVERNOR_CONFIG": str(d.config_path)},
            stdout=log, stderr=log)


def actions(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if (e.get("job") or {}).get("name") == name
            and e["what"] in ("slow", "pause", "resume")]


def a_full_cycle(events: list[dict[str, Any]]) -> bool:
    """slow, then pause, then resume, in that order."""
    seen = [e["what"] for e in events]
    try:
        pause = seen.index("pause", seen.index("slow"))
        seen.index("resume", pause)
    except ValueError:
        return False
    return True


def test_the_demo_heats_trips_slows_pauses_cools_and_resumes(
        daemon: StartDaemon, tmp_path: Path, launched: list[subprocess.Popen[bytes]]) -> None:
    d = daemon(demo_config(tmp_path))
    traces = {name: tmp_path / f"{name}.jsonl" for name in JOBS}
    for name, trace in traces.items():
        launched.append(launch(d, name, trace))

    temperatures: dict[str, list[float]] = {"0": [], "1": []}
    deadline = time.monotonic() + 100
    while True:
        for reading in d.get("/v1/status").json()["readings"]:
            if reading["metric"] == "gpu_temperature_celsius":
                temperatures[reading["labels"]["gpu"]].append(reading["value"])
        events = d.get("/v1/events").json()["events"]
        if all(a_full_cycle(actions(events, name)) for name in JOBS):
            break
        assert time.monotonic() < deadline, (
            f"no full cycle in 100 s: {[(e['what'], e['job']) for e in events]}\n"
            f"{d.log()[-3000:]}")
        time.sleep(0.2)

    for gpu, seen in temperatures.items():
        assert seen[0] < 70 and max(seen) > 80, f"gpu{gpu} heated up: {seen}"
        # from the first time it passed 80 (a resumed job may heat it again, higher)
        hot = next(i for i, t in enumerate(seen) if t > 80)
        assert min(seen[hot:]) < 60, f"gpu{gpu} cooled down once its job was held: {seen}"
    for name in JOBS:
        done = actions(events, name)
        slow = next(e for e in done if e["what"] == "slow")
        assert slow["who"] == "rule gpu-warm" and slow["speed"] == 0.5
        assert slow["why"]["readings"][0]["value"] > 70
        pause = next(e for e in done if e["what"] == "pause")
        assert "rule gpu-hot" in pause["who"]
        assert any(r["rule"] == "gpu-hot" and r["value"] > 80 for r in pause["why"]["readings"])
        resume = next(e for e in done[done.index(pause):] if e["what"] == "resume")
        assert all(r["value"] < 60 for r in resume["why"]["readings"]
                   if r["rule"] == "gpu-hot"), resume
    assert not [e for e in events if e["who"] == "rule gpu-critical"], (
        "the demo never reaches the hard limit, whose pause may not be deferred")

    for launcher in launched:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(15)
    coop = Worker(traces["coop-search"], launched[0])
    trace = coop.events()
    assert coop.named("held") and coop.named("resumed"), "the cooperative job held itself"
    inside = False
    for event in trace:
        if event["event"] == "critical-enter":
            inside = True
        elif event["event"] == "critical-exit":
            inside = False
        assert not (inside and event["event"] == "held"), (
            f"a hold landed inside a checkpoint write at step {event['step']}")
    assert coop.named("critical-exit"), "it wrote checkpoints"
    plain = Worker(traces["plain-search"], launched[1])
    assert plain.named("critical-exit"), "the plain job wrote checkpoints"
    assert os.path.exists(traces["coop-search"].with_suffix(".json"))


def demo_hold_rule() -> dict[str, Any]:
    """The hold rule that config/demo/governor.toml offers, commented out, in place of
    gpu-warm: what a newcomer uncomments."""
    lines = (REPO / "config/demo/governor.toml").read_text().splitlines()
    start = lines.index("# [[rules]]")
    block = []
    for line in lines[start + 1:]:
        if not line.startswith("# ") or "=" not in line:
            break
        block.append(line.removeprefix("# "))
    return tomllib.loads("\n".join(block))


def test_the_demo_with_its_hold_rule_keeps_the_gpus_at_the_target(
        daemon: StartDaemon, tmp_path: Path, launched: list[subprocess.Popen[bytes]]) -> None:
    """The newcomer's change: gpu-warm replaced by the hold rule the config offers, the
    demo at its own pace (its GPUs heat at 9 °C a second: sped up, they would heat faster
    than any GPU does). Both GPUs settle at the target with the jobs slowed, and the pause
    rules never trip. The cooperative job on gpu0 runs its checkpoint writes at full
    speed (it defers a slow inside one), which lifts gpu0 by a few degrees each time."""
    hold = demo_hold_rule()
    assert hold["action"] == "hold", hold
    config = demo_config(tmp_path, speed_up=1.0)
    config["rules"] = [hold] + [r for r in config["rules"] if r["name"] != "gpu-warm"]
    d = daemon(config)
    for name in JOBS:
        launched.append(launch(d, name, tmp_path / f"{name}.jsonl"))

    late: dict[str, list[float]] = {"0": [], "1": []}
    began = time.monotonic()
    while (elapsed := time.monotonic() - began) < 50:
        if elapsed > 35:  # settled
            for reading in d.get("/v1/status").json()["readings"]:
                if reading["metric"] == "gpu_temperature_celsius":
                    late[reading["labels"]["gpu"]].append(reading["value"])
        time.sleep(0.2)
    jobs = d.get("/v1/jobs").json()
    events = d.get("/v1/events").json()["events"]
    what = (f"late temperatures {late}; jobs {[(j['name'], j['speed']) for j in jobs]}; "
            f"events {[(e['what'], e['who']) for e in events]}")
    for seen in late.values():
        assert abs(sum(seen) / len(seen) - hold["target"]) <= 1.5, what
        assert all(abs(t - hold["target"]) <= 6.0 for t in seen), what
    assert all(0 < j["speed"] < 0.6 for j in jobs), what
    # the loop itself may pause a job for a moment (speed 0: min_speed is 0), the pause
    # rules never have to
    assert not [e for e in events if e["what"] == "pause"
                and ("gpu-hot" in e["who"] or "gpu-critical" in e["who"])], what
    rules = d.get("/v1/rules").json()
    held = [r for r in rules if r["name"] == "gpu-hold" and r["target"] == hold["target"]]
    assert len({str(r["series"]) for r in held}) == 2, rules


DEMO_LISTEN = ("127.0.0.1", 9480)
#: what `make demo` starts, each told by its command line
DEMO_PROCESSES = {"the daemon": "governor run", "the guardian": "governor.safety.guardian",
                  "a launcher": "governor launch", "the cooperative job": "coop_search.py",
                  "the signal job": "plain_search.py", "top": "governor top"}


def demo_port_taken() -> bool:
    """True if something listens on the demo's port (a `make demo` of someone's)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(DEMO_LISTEN)
        except OSError:
            return True
    return False


@pytest.mark.parametrize("command", ["make demo", "examples/demo.sh"])
def test_closing_the_demos_terminal_stops_all_it_started(
        command: str, terminal: Tmux, record_property: Callable[[str, object], None]) -> None:
    """Through make (the terminal's session leader is make, which waits for the script)
    and as the script alone (the session leader is bash, which gets the hang-up)."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "governor").exists():
        pytest.skip(f"no governor script beside {sys.executable}")
    if demo_port_taken():
        pytest.skip(f"{DEMO_LISTEN[0]}:{DEMO_LISTEN[1]}, the demo's address, is taken "
                    "(a make demo running?)")
    if command == "make demo" and shutil.which("make") is None:
        pytest.skip("make is not installed")
    argv = (["make", "--no-print-directory", "-o", ".venv/.installed", "demo",
             f"BIN={bin_dir}"] if command == "make demo" else ["examples/demo.sh"])
    mark = f"GOVERNOR_DEMO_TEST_{os.getpid()}"
    try:
        terminal.start("demo", argv, width=80, height=24, cwd=REPO,
                       env={mark: "1", "BIN": str(bin_dir)})
        deadline = time.monotonic() + 60
        screen = ""
        while not all(re.search(rf"{name}\s+(running|slowed|paused)\s+\d+%", screen)
                      for name in JOBS):
            assert time.monotonic() < deadline, f"no job rows on the screen:\n{screen}"
            time.sleep(0.2)
            screen = terminal.screen("demo")
        started = " ".join(" ".join(p.cmdline()) for p in marked(mark))
        for what, command_line in DEMO_PROCESSES.items():
            assert command_line in started, f"{what} is not marked: {started}"

        terminal.close("demo")
        closed = time.monotonic()
        while left := marked(mark):
            assert time.monotonic() < closed + 10, "left 10 s after the terminal closed: " + (
                ", ".join(f"{p.pid} {p.status()} {' '.join(p.cmdline())}" for p in left))
            time.sleep(0.02)
        record_property("seconds_until_all_gone", round(time.monotonic() - closed, 2))
    finally:
        kill_marked(mark)
    log = (REPO / ".governor-demo" / "daemon.log").read_text()
    for name in JOBS:
        assert re.search(rf'"action": "unregister", "job": "{name}"', log), (
            f"{name} was not released before it stopped:\n{log[-3000:]}")
    assert log.rstrip().endswith("governor stopped"), log[-3000:]
