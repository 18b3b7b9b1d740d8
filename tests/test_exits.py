"""ExitWatch: one poll() tells which watched processes exited, and a reused pid is not
taken for the process that was watched."""

from __future__ import annotations

import subprocess
import sys

from governor.jobs.exits import ExitWatch
from governor.jobs.process import ProcessIdentity, identify
from tests.support.processes import eventually


def test_exits_are_noticed_and_the_living_are_not() -> None:
    watch = ExitWatch()
    long, short = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]),
                   subprocess.Popen(["true"]))
    try:
        for key, child in (("long", long), ("short", short)):
            identity = identify(child.pid)
            assert identity is not None
            watch.watch(key, identity)
        short.wait()
        eventually(lambda: watch.exited() == {"short"})
        watch.forget("short")
        assert watch.exited() == set()
        long.kill()
        long.wait()
        eventually(lambda: watch.exited() == {"long"})
    finally:
        long.kill()
        watch.close()


def test_an_identity_that_no_longer_matches_counts_as_exited() -> None:
    watch = ExitWatch()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watch.watch("other", ProcessIdentity(child.pid, 1.0))  # a start time it never had
        assert watch.exited() == {"other"}
    finally:
        child.kill()
        child.wait()
        watch.close()
