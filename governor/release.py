"""Undo every hold the journal lists, without the daemon.

`governor release-all` runs this (systemd's ExecStopPost), and the daemon runs it at
start for holds a crashed run left behind. Each hold kind is undone by the `undo` of the
actuator module that wrote it; undoing twice is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from governor.journal import Journal

log = logging.getLogger(__name__)


def _undoers() -> dict[str, Callable[[dict[str, Any]], str]]:
    from governor.actuators import cgroup, gpu_power, signal

    return {"signal": signal.undo, "cgroup": cgroup.undo, "power_cap": gpu_power.undo}


def release_holds(journal: Journal) -> list[str]:
    """Undo each hold and drop it from the journal. Returns one line per hold."""
    undoers = _undoers()
    done = []
    for key, entry in journal.holds().items():
        undo = undoers.get(str(entry.get("kind")))
        if undo is None:
            line = f"{key}: unknown hold kind {entry.get('kind')!r}; left in the journal"
        else:
            try:
                line = f"{key}: {undo(entry)}"
            except Exception as exc:  # undo must never raise; if it does, keep going
                line = f"{key}: undo failed: {exc}"
            journal.drop_hold(key)
        log.info("release: %s", line)
        done.append(line)
    return done
