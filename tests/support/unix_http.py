"""HTTP over the daemon's unix socket as another user: the socket identifies its callers by
uid (SO_PEERCRED), so a test that plays `nobody` must connect as nobody."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

NOBODY = 65534


def open_to_others(sock: Path) -> None:
    """Let other users reach the daemon's socket, as a group membership would (the daemon
    makes its directory 0750 and the socket 0666)."""
    os.chmod(sock.parent, 0o755)
    os.chmod(sock, 0o666)


def unix_request(path: Path, method: str, target: str, body: str = "",
                 as_uid: int | None = None) -> tuple[int, str]:
    """One HTTP request over a unix socket, from a forked child running as `as_uid` (the
    venv's interpreter is not readable by other users, so no exec). The status, and the
    error's sentence for a 4xx or 5xx, else the body."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_fd)
            if as_uid is not None:
                os.setgid(as_uid)
                os.setuid(as_uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                data = body.encode()
                sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: governor\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                             f"Connection: close\r\n\r\n".encode() + data)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            os.write(write_fd, answer)
        except BaseException as exc:
            os.write(2, f"unix_request child: {exc!r}\n".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    answer = b""
    while chunk := os.read(read_fd, 65536):
        answer += chunk
    os.close(read_fd)
    os.waitpid(child, 0)
    head, _, payload = answer.decode().partition("\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(payload)["error"] if status >= 400 else payload


def socket_dir() -> Path:
    """A directory other users can enter (pytest's tmp is root-only); remove it with
    `shutil.rmtree` when done."""
    base = Path(tempfile.mkdtemp(prefix="governor-sock-"))
    base.chmod(0o755)
    return base
