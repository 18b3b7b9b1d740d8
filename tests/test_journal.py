"""The journal's format: a snapshot and an append-only log of changes since it.

What is measured is what the kernel counts: the bytes this thread handed to write(2)
(`wchar` in /proc/thread-self/io), not time.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import psutil

from governor.safety.journal import Journal
from governor.safety.release import release_holds
from tests.support.processes import busy_child, state, stop


def written() -> int:
    """Bytes this thread has passed to write(2) so far."""
    for line in Path("/proc/thread-self/io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "wchar":
            return int(value)
    raise AssertionError("no wchar in /proc/thread-self/io")


def record(n: int) -> dict[str, Any]:
    """A job's record, of the size a real one has."""
    return {"name": f"job-{n}", "mode": "cooperative", "pid": None, "pid_started_at": None,
            "cgroup": None, "devices": ["gpu0"], "priority": 0, "registered_at": 1.7e9 + n,
            "owner_uid": 65534, "restricted_uid": 65534, "source": "api",
            "scheduler_id": None, "user": "nobody", "held_by_operator": False}


def on_disk(state_dir: Path) -> Journal:
    journal = Journal(state_dir)
    assert journal.load() == []
    return journal


def test_a_change_costs_the_same_with_2000_jobs_as_with_none(tmp_path: Path) -> None:
    """Rewriting the whole state on each change made the 4,000th registration cost 4,000
    records: a change now appends its own line, and compaction adds a bounded share."""
    journal = Journal(tmp_path)
    journal.put_job("warm", record(0))  # the first write of a journal writes a snapshot
    line = len(json.dumps(record(0))) + 60  # the change's line: the record, op, key
    before = written()
    for n in range(2000):
        journal.put_job(f"j{n:05}", record(n))
    grown = (written() - before) / 2000
    before = written()
    for n in range(0, 2000, 2):
        journal.drop_job(f"j{n:05}")
    dropped = (written() - before) / 1000
    journal.close()
    assert grown < 3 * line, f"{grown:.0f} bytes per registration, a line is {line}"
    assert dropped < 3 * line, f"{dropped:.0f} bytes per unregistration"
    assert set(on_disk(tmp_path).jobs()) == {"warm"} | {f"j{n:05}" for n in range(1, 2000, 2)}


def test_the_log_replays_over_the_snapshot_and_compacts(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.put_hold("signal:a", {"kind": "signal", "job": "a"})
    journal.put_job("a", record(1))
    journal.put_hold("signal:a", {"kind": "signal", "job": "a", "state": "stopped"})
    journal.drop_job("a")
    snapshot = json.loads((tmp_path / "journal.json").read_text())
    assert snapshot["holds"] == {"signal:a": {"kind": "signal", "job": "a"}}, (
        "after the first write, changes go to the log, not the snapshot")
    again = on_disk(tmp_path)
    assert again.holds() == {"signal:a": {"kind": "signal", "job": "a", "state": "stopped"}}
    assert again.jobs() == {}
    # a big enough log is folded into a new snapshot, and the log starts again
    for n in range(1500):
        journal.put_job(f"j{n}", record(n))
    assert (tmp_path / "journal.log").stat().st_size < 256 * 1024 + 1024
    assert len(json.loads((tmp_path / "journal.json").read_text())["jobs"]) > 500
    assert len(on_disk(tmp_path).jobs()) == 1500
    journal.close()


def test_a_torn_last_line_is_ignored_and_the_next_change_is_whole(tmp_path: Path) -> None:
    """A crash mid-write leaves part of a line: that change never returned, so it is not
    in the state; the next daemon's changes read back whole."""
    journal = Journal(tmp_path)
    journal.put_job("a", record(1))
    journal.put_job("b", record(2))
    journal.close()
    log = tmp_path / "journal.log"
    with log.open("ab") as f:
        f.write(b'{"key":"c","op":"put","table":"jobs","value":{"name":"jo')
    after_crash = on_disk(tmp_path)
    assert set(after_crash.jobs()) == {"a", "b"}
    after_crash.put_job("d", record(4))
    after_crash.drop_job("a")
    after_crash.close()
    assert set(on_disk(tmp_path).jobs()) == {"b", "d"}


def test_a_line_in_the_middle_that_cannot_be_read_is_reported_and_skipped(
        tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.put_job("a", record(1))
    journal.close()
    log = tmp_path / "journal.log"
    with log.open("ab") as f:
        f.write(b"garbage\n")
        f.write(b'{"key":"b","op":"put","table":"jobs","value":{"name":"b"}}\n')
    again = Journal(tmp_path)
    assert again.load() == [f"{log}: line 2 is unreadable; skipped"]
    assert set(again.jobs()) == {"a", "b"}


def test_a_log_left_from_before_the_last_snapshot_is_ignored(tmp_path: Path) -> None:
    """A crash after a compaction's new snapshot and before its new log: the old log's
    changes are all in the snapshot, and replaying them would bring back dropped holds."""
    journal = Journal(tmp_path)
    journal.put_hold("signal:a", {"kind": "signal", "job": "a"})
    journal.close()
    old_log = (tmp_path / "journal.log").read_bytes()
    later = on_disk(tmp_path)
    later.drop_hold("signal:a")  # its first write compacts: a new snapshot and log
    later.close()
    (tmp_path / "journal.log").write_bytes(old_log)
    assert on_disk(tmp_path).holds() == {}


def test_a_writer_whose_log_was_replaced_rewrites_the_state(tmp_path: Path) -> None:
    """release-all run beside a live daemon compacts the journal; the daemon's next hold
    must not go to the log release-all replaced, where no reader would find it."""
    daemon = Journal(tmp_path)
    daemon.put_hold("signal:a", {"kind": "signal", "job": "a"})
    release = on_disk(tmp_path)
    release.drop_hold("signal:a")
    release.close()
    daemon.put_hold("signal:b", {"kind": "signal", "job": "b"})
    daemon.close()
    assert set(on_disk(tmp_path).holds()) == {"signal:a", "signal:b"}, (
        "the daemon's state, as before the log: the last writer's state is on disk")


def test_a_version_1_journal_from_an_earlier_governor_is_released(tmp_path: Path) -> None:
    """The snapshot alone, as governor wrote it before the log: release-all and the
    guardian read it, and a daemon's first change writes the new format."""
    target = busy_child()
    try:
        os.kill(target.pid, signal.SIGSTOP)
        started = psutil.Process(target.pid).create_time()
        (tmp_path / "journal.json").write_text(json.dumps({
            "version": 1, "jobs": {"x": record(1)},
            "holds": {"signal:x": {"kind": "signal", "job": "x", "state": "stopped",
                                   "processes": [[target.pid, started]]}}}, indent=1))
        journal = on_disk(tmp_path)
        assert set(journal.jobs()) == {"x"}
        (released,) = release_holds(journal)
        assert released.ok, released
        assert state(target.pid) != "T"
        journal.close()
        again = on_disk(tmp_path)
        assert (again.holds(), set(again.jobs())) == ({}, {"x"})
        assert json.loads((tmp_path / "journal.json").read_text())["version"] == 2
    finally:
        stop(target)

