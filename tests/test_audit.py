"""The audit log: AuditLog on its own, then a real daemon recording operator requests and
rule-made actions, serving them on /v1/events and `governor events`, and going on acting
when every write fails (state_dir/audit.jsonl -> /dev/full)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from governor.cli.main import since_spec
from governor.config import parse_config
from governor.jobs.errors import NoSuchJob
from governor.service.audit import AuditLog
from tests.support.c_nvml import CNvmlState
from tests.support.cli import governor
from tests.support.daemon import DaemonProcess
from tests.support.fake_nvml import h100
from tests.support.processes import eventually
from tests.support.scenario import CPU_HOT, ROOT, config, heat, running, spawn, stopped

StartDaemon = Callable[..., DaemonProcess]
Children = list[subprocess.Popen[bytes]]
SERIES = 'cpu_temperature_celsius{chip="platform_coretemp_0",sensor="Package id 0"}'


class Clock:
    """Wall time that a test steps by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "audit.jsonl"


# ---- AuditLog --------------------------------------------------------------------------


def test_each_event_is_one_json_line_with_time_and_seq(log_path: Path) -> None:
    audit = AuditLog(log_path, 1_000_000, 3)
    audit.append({"who": "token", "what": "register", "job": {"id": "a1", "name": "x\ny"}})
    audit.append({"who": "rule cpu-hot", "what": "pause"})
    first, second = lines(log_path)
    assert (first["seq"], second["seq"]) == (1, 2)
    assert isinstance(first["time"], float) and first["time"] <= second["time"]
    assert first["who"] == "token" and first["job"]["name"] == "x\ny"
    assert second["what"] == "pause"
    assert audit.status() == {"path": str(log_path), "ok": True, "errors": 0,
                              "last_error": None, "last_error_at": None}


def test_seq_goes_on_after_reopening(log_path: Path) -> None:
    audit = AuditLog(log_path, 4096, 3)
    for _ in range(40):
        audit.append({"what": "pause", "why": {"reasons": ["x" * 200]}})
    audit.close()
    assert AuditLog(log_path, 4096, 3).read(0, 10_000)[-1]["seq"] == 40
    reopened = AuditLog(log_path, 4096, 3)
    reopened.append({"what": "resume"})
    assert lines(log_path)[-1]["seq"] == 41
    reopened.close()
    newest_rotated = lines(log_path.with_name("audit.jsonl.1"))[-1]["seq"]
    log_path.unlink()  # only rotated files left: seq goes on from the newest of them
    again = AuditLog(log_path, 4096, 3)
    again.append({"what": "resume"})
    assert lines(log_path)[-1]["seq"] == newest_rotated + 1


def test_rotation_by_size_keeps_keep_files(log_path: Path) -> None:
    audit = AuditLog(log_path, 4096, 2)
    for _ in range(200):
        audit.append({"what": "slow", "why": {"reasons": ["y" * 100]}})
    files = sorted(p.name for p in log_path.parent.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for path in log_path.parent.iterdir():
        assert path.stat().st_size <= 4096
    kept = audit.read(0, 10_000)
    seqs = [e["seq"] for e in kept]
    assert seqs == list(range(seqs[0], 201)) and seqs[0] > 1, "the oldest file was dropped"
    assert kept == lines(log_path.with_name("audit.jsonl.2")) + lines(
        log_path.with_name("audit.jsonl.1")) + lines(log_path)
    audit.configure(4096, 1)  # fewer kept after a reload: the surplus goes at the next turn
    for _ in range(40):
        audit.append({"what": "slow", "why": {"reasons": ["y" * 100]}})
    assert sorted(p.name for p in log_path.parent.iterdir()) == ["audit.jsonl", "audit.jsonl.1"]


def test_corrupt_and_partial_lines_are_skipped(log_path: Path) -> None:
    audit = AuditLog(log_path, 1_000_000, 3, clock=Clock())
    audit.append({"what": "register"})
    audit.close()
    with open(log_path, "ab") as f:
        f.write(b'not json\n\x00\x00\x00\n[1, 2]\n{"time": "soon", "seq": 9}\n')
    audit = AuditLog(log_path, 1_000_000, 3, clock=Clock())
    audit.append({"what": "pause"})
    audit.close()
    with open(log_path, "ab") as f:
        f.write(b'{"time": 2000.0, "seq": 3, "what": "res')  # a torn last line
    audit = AuditLog(log_path, 1_000_000, 3, clock=Clock())
    assert [e["what"] for e in audit.read(0, 100)] == ["register", "pause"]
    audit.append({"what": "resume"})
    assert [e["what"] for e in audit.read(0, 100)] == ["register", "pause", "resume"], (
        "the next event starts on a line of its own after a torn one")


def test_read_since_and_limit(log_path: Path) -> None:
    audit = AuditLog(log_path, 4096, 5, clock=Clock())
    for index in range(100):
        audit.append({"what": "slow", "n": index, "pad": "z" * 100})
    times = [e["time"] for e in audit.read(0, 10_000)]
    assert times == sorted(times) and len(times) == 100
    page = audit.read(times[49], 3)
    assert [e["n"] for e in page] == [50, 51, 52], "after since, oldest first, at most limit"
    assert audit.read(times[-1], 10) == []


def test_read_since_skips_older_files_and_lines(log_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A read of the last events parses a few lines near them, not every line before:
    older rotated files are passed over on their tail, and the current file is bisected
    on its lines' times."""
    import governor.service.audit as audit_module

    audit = AuditLog(log_path, 400_000, 5, clock=Clock())
    for index in range(6000):  # about 2.4 MB: the current file and several rotated ones
        audit.append({"what": "slow", "n": index, "pad": "z" * 300})
    assert len(list(log_path.parent.iterdir())) >= 4, "rotated files exist"
    times = [e["time"] for e in audit.read(0, 10_000)]
    assert len(times) == 6000

    parsed = []
    parse = audit_module.parse

    def counting(line: bytes) -> dict[str, Any] | None:
        parsed.append(line)
        return parse(line)

    monkeypatch.setattr(audit_module, "parse", counting)
    page = audit.read(times[-11], 5)
    assert [e["n"] for e in page] == [5990, 5991, 5992, 5993, 5994]
    # each file's tail (64 KiB, ~170 lines) to skip it or not, a few bisection probes,
    # and the lines from the start point on: far from the 6000 lines before
    assert len(parsed) < 1500, f"{len(parsed)} lines parsed to find 5 events"
    parsed.clear()
    middle = audit.read(times[2999], 3)
    assert [e["n"] for e in middle] == [3000, 3001, 3002], "found inside a rotated file"
    assert len(parsed) < 1500, f"{len(parsed)} lines parsed to find 3 events"


def test_a_failing_disk_never_raises_and_is_reported(
        log_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log_path.parent.mkdir()
    log_path.symlink_to("/dev/full")
    counted: list[int] = []
    audit = AuditLog(log_path, 4096, 3, on_error=lambda: counted.append(1))
    with caplog.at_level(logging.ERROR, logger="governor.service.audit"):
        for _ in range(3):
            audit.append({"what": "pause"})
    status = audit.status()
    assert status["ok"] is False and status["errors"] == 3 and len(counted) == 3
    assert "No space left on device" in status["last_error"]
    assert isinstance(status["last_error_at"], float)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1, (
        "one error is logged once")
    assert audit.read(0, 100) == [], "a device is never read (/dev/full reads forever)"
    log_path.unlink()  # space again: the next event reopens the file and is written
    audit.append({"what": "resume"})
    assert audit.status()["ok"] is True and audit.status()["errors"] == 3
    (event,) = lines(log_path)
    assert event["what"] == "resume" and event["seq"] == 4, "the gap shows what was lost"


def test_audit_config_defaults_and_limits() -> None:
    default = parse_config({}).audit
    assert (default.max_bytes, default.keep) == (10_000_000, 3)
    assert (default.per_user_events, default.per_user_window) == (20, 60.0)
    from governor.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config({"audit": {"max_bytes": 100, "keep": 0, "size": 1, "per_user_events": 0,
                                "per_user_window": "0.5s"}})
    keys = sorted(p.key for p in caught.value.problems)
    assert keys == ["audit.keep", "audit.max_bytes", "audit.per_user_events",
                    "audit.per_user_window", "audit.size"]


class Monotonic:
    """The controller's monotonic clock, stepped by hand."""

    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_one_users_refusals_cannot_rotate_out_another_users_record(tmp_path: Path) -> None:
    """10,000 refused requests from one uid over the socket (3,000 took 2 s, and 70 s
    rotated 40 MB of history away): the first few are written, the rest counted and summed
    up when the window closes, and the other users' events stay in the log."""
    from governor.control.controller import Controller
    from governor.jobs.registry import Caller
    from governor.safety.journal import Journal

    settings = parse_config({"audit": {"max_bytes": 65536, "keep": 1}})
    audit = AuditLog(tmp_path / "audit.jsonl", settings.audit.max_bytes, settings.audit.keep)
    clock = Monotonic()
    controller = Controller(settings, Journal(tmp_path / "state"), {}, None,
                            audit=audit.append, clock=clock)
    alice, nobody = Caller(1000, "uid 1000 (unix socket)"), Caller(65534, "uid 65534")

    def refused(caller: Caller, job_id: str) -> None:
        with pytest.raises(NoSuchJob):
            controller.unregister(job_id, caller)

    refused(alice, "alices-job")
    refused(Caller(None, "token"), "tokens-job")
    for n in range(10_000):
        refused(nobody, f"flood-{n}")
    kept = {(e["who"], e["job"]["id"]) for e in audit.read(0, 100_000) if e["job"]}
    assert ("uid 1000 (unix socket)", "alices-job") in kept
    assert ("token", "tokens-job") in kept

    clock.now += settings.audit.per_user_window
    refused(nobody, "after-the-window")
    refused(alice, "alices-next")
    written = audit.read(0, 100_000)
    floods = [e for e in written if e["who"] == "uid 65534"]
    full = settings.audit.per_user_events
    assert len(floods) == full + 2, "the first few in full, one summary, then a new window"
    (summary,) = [e for e in floods if e["what"] == "suppressed"]
    assert summary["count"] == 10_000 - full
    assert summary["counted"] == {"unregister-refused": 10_000 - full}
    assert summary["why"]["reasons"] == [
        f"{10_000 - full} more event(s) from uid 65534 within 1m were counted, not written "
        f"({10_000 - full} unregister-refused): audit.per_user_events = {full}"]
    assert floods[-1]["job"]["id"] == "after-the-window"
    assert (tmp_path / "audit.jsonl").stat().st_size < 65536, "not rotated even once"


def test_events_has_help() -> None:
    result = governor("events", "--help")
    assert result.returncode == 0 and "usage: governor events" in result.stdout
    assert "--since SPEC" in result.stdout


def test_since_spec() -> None:
    assert since_spec("1714564800") == 1714564800.0
    assert since_spec("2024-05-01T12:00:00+00:00") == 1714564800.0
    assert since_spec("2024-05-01T12:00:00Z") == 1714564800.0
    assert math.isclose(since_spec("10m"), time.time() - 600, abs_tol=5)
    assert math.isclose(since_spec("2h"), time.time() - 7200, abs_tol=5)
    for bad in ("yesterday", "10 parsecs", "nan", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            since_spec(bad)


# ---- a real daemon ---------------------------------------------------------------------


def events(d: DaemonProcess, since: float = 0.0) -> list[dict[str, Any]]:
    response = d.get("/v1/events", params={"since": since})
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


def one(d: DaemonProcess, what: str, who: str | None = None) -> dict[str, Any]:
    """The one event `what` (by `who`), once it is there."""
    def found() -> list[dict[str, Any]]:
        return [e for e in events(d) if e["what"] == what and who in (None, e["who"])]

    eventually(lambda: len(found()) == 1, what=f"one {what} event by {who}")
    return found()[0]


def metric(d: DaemonProcess, name: str) -> float:
    for line in d.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in the exposition")


@pytest.fixture
def d(daemon: StartDaemon, sys_tree: Path, proc_tree: Path) -> DaemonProcess:
    return daemon(config(sys_tree, proc_tree))


def test_operator_requests_are_audited_with_the_caller(
        d: DaemonProcess, children: Children) -> None:
    pid = spawn(children)
    job = d.register(name="trainer", pid=pid)
    ref = {"id": job["id"], "name": "trainer", "pid": pid, "mode": "signal"}
    assert d.call("POST", f"/v1/jobs/{job['id']}/pause").status_code == 200
    assert d.call("POST", f"/v1/jobs/{job['id']}/resume").status_code == 200
    assert d.call("POST", "/v1/jobs/nosuchjob/pause").status_code == 404
    assert d.call("POST", "/v1/reload").status_code == 200
    good = d.config_path.read_text()
    d.config_path.write_text(good.replace("above = 80.0", "above = 'hot'"))
    assert d.call("POST", "/v1/reload").status_code == 422
    d.config_path.write_text(good)
    assert d.call("DELETE", f"/v1/jobs/{job['id']}").status_code == 204

    register = one(d, "register")
    assert register["who"] == "token" and register["job"] == ref
    request = one(d, "operator-pause")
    action = one(d, "pause")
    assert request["who"] == action["who"] == "token" and action["job"] == ref
    assert request["seq"] < action["seq"], "the request, then what it did"
    assert action["why"]["reasons"] == ["operator pause"] and action["round"] is None
    resumed = one(d, "resume")
    assert resumed["who"] == "token" and resumed["why"]["reasons"] == ["operator hold lifted"]
    assert one(d, "operator-resume")["job"] == ref
    refused = one(d, "operator-pause-refused")
    assert refused["status"] == 404 and refused["job"]["id"] == "nosuchjob"
    assert refused["why"]["reasons"] == ["There is no job 'nosuchjob'."]
    assert one(d, "reload")["who"] == "token"
    problem = one(d, "reload-refused")["why"]["reasons"]
    assert problem == [f"{d.config_path}: rules[0].above (rule \"cpu-hot\"): should be a valid "
                       "number (got 'hot')"]
    assert one(d, "unregister")["job"] == ref
    assert one(d, "start")["who"] == "governor"

    on_disk = lines(d.workdir / "state" / "audit.jsonl")
    assert on_disk == events(d)
    seqs = [e["seq"] for e in on_disk]
    assert seqs == list(range(1, len(seqs) + 1))

    printed = d.cli("events")
    assert printed.returncode == 0, printed.stderr
    rows = printed.stdout.splitlines()
    assert rows[0].split() == ["time", "who", "what", "job", "why"]
    assert len(rows) == len(on_disk) + 1, "a line per event"
    pause_row = next(r for r in rows if " operator-pause " in r)
    assert f"trainer ({job['id']})" in pause_row and "held by the operator" in pause_row
    as_json = d.cli("events", "--json")
    assert json.loads(as_json.stdout)["events"] == on_disk
    assert d.cli("events", "--since", "1h").stdout == printed.stdout
    later = d.cli("events", "--since", str(on_disk[-1]["time"]))
    assert later.returncode == 0 and later.stdout.strip() == "no events"
    bad = d.cli("events", "--since", "last tuesday")
    assert bad.returncode == 2 and "not Unix seconds" in bad.stderr
    d.stop()
    assert lines(d.workdir / "state" / "audit.jsonl")[-1]["what"] == "stop"


def test_rule_made_actions_carry_the_readings_and_the_round(
        d: DaemonProcess, sys_tree: Path, children: Children) -> None:
    pid = spawn(children)
    job = d.register(name="trainer", pid=pid)
    heat(sys_tree, 95)
    eventually(stopped(pid))
    paused = one(d, "pause", "rule cpu-hot")
    assert paused["job"] == {"id": job["id"], "name": "trainer", "pid": pid, "mode": "signal"}
    assert paused["why"]["reasons"] == [f"cpu-hot: {SERIES} = 95 (above 80)"]
    assert paused["why"]["readings"] == [{"rule": "cpu-hot", "series": SERIES, "value": 95.0,
                                          "threshold": 80.0, "state": "tripped"}]
    assert paused["speed"] == 0.0
    heat(sys_tree, 60)
    eventually(running(pid))
    resumed = one(d, "resume", "rule cpu-hot")
    assert resumed["why"]["reasons"] == ["cpu-hot cleared"]
    assert resumed["why"]["readings"] == [{"rule": "cpu-hot", "series": SERIES, "value": 60.0,
                                           "threshold": CPU_HOT["clear_below"], "state": "ok"}]
    sequence = d.get("/v1/status").json()["sequence"]
    assert isinstance(paused["round"], int) and paused["round"] < resumed["round"] <= sequence

    assert [e["seq"] for e in events(d, since=paused["time"])] == list(
        range(paused["seq"] + 1, resumed["seq"] + 1)), "since: only later events"
    assert events(d, since=resumed["time"]) == []
    limited = d.get("/v1/events", params={"limit": 2}).json()["events"]
    assert [e["seq"] for e in limited] == [1, 2]
    for params in ({"since": "soon"}, {"since": "nan"}, {"limit": 0}, {"limit": 10001}):
        bad = d.get("/v1/events", params=params)
        assert bad.status_code == 422 and set(bad.json()) == {"error"}, (params, bad.text)
    row = next(r for r in d.cli("events").stdout.splitlines() if " resume " in r)
    assert "rule cpu-hot" in row and "cpu-hot cleared; now" in row and "= 60" in row


@pytest.mark.skipif(not ROOT, reason="setting a power limit needs root")
def test_power_caps_are_audited_per_gpu(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path, c_nvml: CNvmlState,
        children: Children) -> None:
    gpus = {"gpus": [h100(0, temperature=60)]}
    c_nvml.write(gpus)
    rule = {"name": "cap", "metric": "gpu_temperature_celsius", "above": 80.0, "for": 0,
            "clear_below": 75.0, "action": "power_cap", "power_cap_watts": 250}
    d = daemon(config(sys_tree, proc_tree, rule), c_nvml=c_nvml)
    d.register(name="on-gpu0", pid=spawn(children), devices=["gpu0"])
    gpus["gpus"][0]["temperature"] = 85
    c_nvml.write(gpus)
    capped = one(d, "power_cap")
    assert (capped["who"], capped["gpu"], capped["watts"], capped["job"]) == (
        "rule cap", "0", 250, None)
    assert capped["why"]["readings"] == [{"rule": "cap", "series": 'gpu_temperature_celsius'
                                          '{gpu="0"}', "value": 85.0, "threshold": 80.0,
                                          "state": "tripped"}]
    gpus["gpus"][0]["temperature"] = 70
    c_nvml.write(gpus)
    restored = one(d, "restore")
    assert restored["who"] == "rule cap" and restored["watts"] is None
    assert restored["why"]["reasons"] == ["cap cleared"]
    assert [r["value"] for r in restored["why"]["readings"]] == [70.0]
    assert capped["round"] < restored["round"]


def test_a_full_disk_stops_no_action_and_is_reported(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path, tmp_path: Path,
        children: Children) -> None:
    state_dir = tmp_path / "full-state"
    state_dir.mkdir()
    audit_file = state_dir / "audit.jsonl"
    audit_file.symlink_to("/dev/full")  # every write fails with ENOSPC
    d = daemon(config(sys_tree, proc_tree, daemon={"state_dir": str(state_dir)}))
    pid = spawn(children)
    job = d.register(name="trainer", pid=pid)
    heat(sys_tree, 95)
    eventually(stopped(pid), what="the rule still pauses the job")
    heat(sys_tree, 60)
    eventually(running(pid), what="and resumes it")

    audit = d.get("/v1/status").json()["audit"]
    assert audit["path"] == str(audit_file) and audit["ok"] is False
    assert audit["errors"] >= 4, "start, register, pause, resume: none written"
    assert "No space left on device" in audit["last_error"]
    assert isinstance(audit["last_error_at"], float)
    assert metric(d, "governor_audit_errors_total") == audit["errors"]
    assert d.get("/healthz").status_code == 200
    assert events(d) == []
    assert d.log().count("ERROR governor.service.audit") == 1, "logged once, not per event"

    audit_file.unlink()  # space again: the next event is written
    assert d.call("POST", f"/v1/jobs/{job['id']}/pause").status_code == 200
    eventually(stopped(pid))
    assert [e["what"] for e in events(d)] == ["operator-pause", "pause"]
    assert d.get("/v1/status").json()["audit"]["ok"] is True
