"""A real terminal for the tests: tmux, on a socket of the test's own.

A tmux pane is a pseudo-terminal that a program draws on as on any terminal, and
`capture-pane` reads its screen back as text. Killing a session closes the pane's
terminal as closing a window or losing an ssh session does: it hangs up.

The processes a test starts in a pane carry a mark in their environment, which every
process they start inherits, detached (setsid) or not: `marked` finds them all, to check
that none is left and to clean up after a failed test.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil


class Tmux:
    """A tmux server of a test's own: its sessions, their screens, and their end."""

    def __init__(self, socket: Path):
        self.socket = socket

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True,
                              text=True, timeout=30, check=False)

    def start(self, session: str, argv: Sequence[str], *, width: int, height: int,
              cwd: Path, env: Mapping[str, str]) -> None:
        """Run argv in a new detached session width x height, with env added to the
        server's environment (the test's)."""
        command = ["env", *(f"{k}={v}" for k, v in env.items()), *argv]
        result = self.run("new-session", "-d", "-s", session, "-x", str(width),
                          "-y", str(height), "-c", str(cwd), *command)
        assert result.returncode == 0, result.stderr

    def screen(self, session: str) -> str:
        """The text on the session's screen now, a line per row."""
        result = self.run("capture-pane", "-p", "-t", session)
        return result.stdout if result.returncode == 0 else ""

    def close(self, session: str) -> None:
        """Kill the session: its terminal hangs up."""
        self.run("kill-session", "-t", session)

    def stop(self) -> None:
        self.run("kill-server")
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


def have_tmux() -> bool:
    return shutil.which("tmux") is not None


def marked(mark: str) -> list[psutil.Process]:
    """The live processes whose environment holds `mark`=1 (a zombie's environment cannot
    be read: it is not running any more)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get(mark) == "1":
                found.append(process)
    return found


def kill_marked(mark: str) -> None:
    """Kill whatever is left of a test's processes, stopped ones too."""
    for process in marked(mark):
        with contextlib.suppress(psutil.Error):
            process.resume()
            process.kill()
