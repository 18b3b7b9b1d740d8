"""Undo every hold the journal lists, without the daemon.

`governor release-all` runs this (systemd's ExecStopPost), the guardian runs it when the
daemon dies, and the daemon runs it at start for holds a crashed run left behind. Each
hold kind is undone by the actuator module that wrote it. A hold that could not be fully
undone stays in the journal, so a later release-all tries again; undoing twice is
harmless.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from governor.actuators.modes import Undo, hold_undoers
from governor.safety.journal import Journal

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Released:
    key: str
    ok: bool
    line: str

    def __str__(self) -> str:
        return f"{self.key}: {self.line}" + ("" if self.ok else " (kept in the journal)")


#: hold kind -> how to undo it, from the modes' table; imported up front, so that a
#: guardian waiting for its daemon to die has everything loaded and acts within
#: milliseconds
UNDOERS: dict[str, Undo] = hold_undoers()


def release_holds(journal: Journal) -> list[Released]:
    """Undo each hold; drop the ones fully undone. One result per hold."""
    undoers = UNDOERS
    results = []
    for key, entry in journal.holds().items():
        undo = undoers.get(str(entry.get("kind")))
        if undo is None:
            result = Released(key, False, f"unknown hold kind {entry.get('kind')!r}")
        else:
            try:
                ok, line = undo(entry)
            except Exception as exc:  # undo must never raise; if it does, keep going
                ok, line = False, f"undo failed: {exc}"
            result = Released(key, ok, line)
            if ok:
                journal.drop_hold(key)
        log.log(logging.INFO if result.ok else logging.ERROR, "release: %s", result)
        results.append(result)
    return results
