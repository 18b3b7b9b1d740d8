"""Names that came from elsewhere (a Slurm job's name, a pod's) printed by the CLI and
written to the daemon's log: control characters escaped, so a name can neither forge a
log line nor send a terminal escape sequences. The API refuses such names
(tests/test_api_limits.py); a scheduler's are not checked, so printing must not trust
them."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

from rich.console import Console

from governor.cli import top
from governor.cli.report import render_events, render_jobs
from governor.cli.status_model import Status
from governor.text import printable, unprintable
from tests.support.daemon import REPO

FORGED = 'trainer\nINFO governor.actions: {"action": "resume", "job": "victim"}'
ESCAPES = "\x1b[2J\x1b]0;owned\x07"


def job(name: str, **extra: Any) -> dict[str, Any]:
    return {"id": "aaaa0001", "name": name, "pid": 4242, "cgroup": None, "mode": "suspend",
            "devices": ["gpu0"], "priority": 0, "state": "paused", "speed": 0.0,
            "reasons": [f"cpu-hot: pause {ESCAPES}"], "held_by_operator": False,
            "source": "slurm", "scheduler_id": "123", "user": "eve\x1b[8m", **extra}


def status(*jobs: dict[str, Any]) -> dict[str, Any]:
    return {"samplers": [], "readings": [], "rules": [], "jobs": list(jobs),
            "power_caps": {}}


def test_printable_escapes_only_what_moves_the_cursor_or_hides_text() -> None:
    assert printable("llama-7b ünïcödé 日本") == "llama-7b ünïcödé 日本"
    assert printable("a\nb\x1b[2J\u202ec") == "a\\nb\\x1b[2J\\u202ec"
    assert unprintable("ok") is None and unprintable("a\tb") == "U+0009"


def test_governor_jobs_prints_names_escaped() -> None:
    out = render_jobs(Status.parse(status(job(FORGED + ESCAPES))).jobs)
    assert "\x1b" not in out and "\x07" not in out
    assert len(out.splitlines()) == 2, out
    assert "trainer\\nINFO governor.actions" in out and "\\x1b[2J" in out


def test_governor_events_prints_names_escaped() -> None:
    event = {"time": 1_700_000_000.0, "seq": 1, "who": "rule cpu-hot", "what": "pause",
             "job": {"id": "aaaa0001", "name": FORGED}, "round": 3,
             "why": {"reasons": [ESCAPES], "readings": []}}
    out = render_events([event])
    assert "\x1b" not in out and len(out.splitlines()) == 2, out


def test_top_prints_names_escaped() -> None:
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(top.render(status(job(FORGED + ESCAPES)), where="http://127.0.0.1:9474"))
    out = console.export_text()
    assert "\x1b" not in out and "\x07" not in out, repr(out)
    assert "trainer\\nINFO" in out and "eve\\x1b[8m" in out


def test_the_daemon_log_keeps_a_name_on_its_own_line() -> None:
    """The daemon's own log set-up (`governor run`), in a process of its own."""
    code = ("import logging; from governor.cli.main import setup_logging; setup_logging(); "
            "logging.getLogger('governor.control.controller').warning("
            "'job %s (%s): cannot hold it', 'aaaa0001', " + repr(FORGED) + ")")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert "governor.actions" in lines[0] and lines[0].startswith(
        ("WARNING", "20")), lines[0]
