"""`governor launch -- CMD`: run CMD as a governed job, registered before it runs.

The child forks, puts itself in a process group of its own and waits on a pipe; the
launcher registers the child's pid and only then lets it exec CMD, so no instruction of
CMD runs ungoverned (in cgroup mode it is already in its own cgroup). The launcher
unregisters the job when CMD ends, and exits with CMD's status. SIGINT, SIGTERM and
SIGHUP are forwarded to the group after the job is unregistered (which resumes it): a
stopped process could not act on them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType

from governor.client import ApiClient, ClientError

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _child(read_fd: int, argv: Sequence[str]) -> None:
    """In the forked child: wait for the job id, then become CMD. Never returns."""
    try:
        os.setpgid(0, 0)
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
        os.close(read_fd)
        if not chunks:  # registration failed; the launcher says why
            os._exit(127)
        env = dict(os.environ, **json.loads(b"".join(chunks)))
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        os.execvpe(argv[0], list(argv), env)
    except OSError as exc:
        print(f"governor launch: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(127)
    os._exit(127)


def launch(client: ApiClient, argv: Sequence[str], *, name: str, mode: str | None,
           devices: list[str], priority: int) -> int:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_fd)
        _child(read_fd, argv)
    os.close(read_fd)
    with contextlib.suppress(OSError):  # the child may have done it already
        os.setpgid(pid, pid)
    try:
        job = client.register(name, pid=pid, mode=mode or "signal", devices=devices,
                              priority=priority, source="launch")
    except ClientError:
        os.close(write_fd)
        os.waitpid(pid, 0)
        raise
    registered = [str(job["id"])]

    def release() -> None:
        while registered:
            with contextlib.suppress(ClientError):
                client.unregister(registered.pop())

    try:
        env = {"GOVERNOR_URL": client.url, "GOVERNOR_JOB_ID": registered[0]}
        if client.socket is not None:
            env["GOVERNOR_SOCKET"] = client.socket
        os.write(write_fd, json.dumps(env).encode())
        os.close(write_fd)
        return _wait(pid, release)
    finally:
        release()


def _wait(pid: int, release: Callable[[], None]) -> int:
    def forward(signum: int, _: FrameType | None) -> None:
        release()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                return 127
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
