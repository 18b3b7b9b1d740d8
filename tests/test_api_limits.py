"""What a client without a token can take from the daemon: memory, connections, threads.

Real daemons and raw sockets. A huge body is refused before it is read; a request sent
by halves is cut off; a flood of idle connections fills the TCP listener's room and no
more, while the unix socket still answers and a hot GPU is still capped within a round;
audit-log reads in flight never hold up an operator's pause; and names that would forge
a log line or drive a terminal are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.c_nvml import CNvmlState
from tests.support.daemon import DaemonProcess
from tests.support.fake_nvml import h100
from tests.support.processes import eventually, state
from tests.support.scenario import ROOT, config, spawn
from tests.support.unix_http import NOBODY, open_to_others, unix_request

StartDaemon = Callable[..., DaemonProcess]
QUIET = {"daemon": {"interval": 0.25}, "sources": {"nvml": "off"}}
MiB = 1024 * 1024
#: generous: how long a test waits for the server to close a socket it should close
CLOSE_WAIT = 30.0


def quiet(**api: Any) -> dict[str, Any]:
    return {**QUIET, "api": api}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def connect(d: DaemonProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", d.port), timeout=CLOSE_WAIT)


def closed_by_server(sock: socket.socket) -> bool:
    """Waits (up to CLOSE_WAIT) for the server to close `sock`, reading what it sends."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def stream_body(d: DaemonProcess, head: bytes, size: int, chunked: bool) -> tuple[bytes, int]:
    """Sends `head` and then up to `size` bytes of body, stopping as soon as the server
    answers or closes; returns what the server answered and how much was sent."""
    piece = b"x" * (64 * 1024)
    frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece
    sent, answer = 0, b""
    with connect(d) as sock:
        sock.sendall(head)
        try:
            while sent < size:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                sock.sendall(frame)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer, sent


# ---- bodies --------------------------------------------------------------------------


def test_a_huge_body_without_a_token_is_refused_before_it_is_read(
        daemon: StartDaemon) -> None:
    d = daemon(quiet())
    assert d.proc is not None
    # the code that refuses is loaded before the baseline is taken
    warm = d.call("POST", "/v1/jobs", auth=False, json={"name": "x", "pid": 1})
    assert warm.status_code == 401
    before = rss_kib(d.proc.pid)

    size = 100 * MiB
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    answer, sent = stream_body(d, head, size, chunked=False)
    assert sent < size, "the server closed the connection before the body was sent"
    if answer:  # (a reset may take the answer with it)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b"larger than api.max_body_bytes = 65536 bytes" in answer

    # no Content-Length to go by: a chunked body is refused for want of a token, unread
    head = (b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    answer, sent = stream_body(d, head, size, chunked=True)
    assert sent < size, "the server closed the connection before the body was sent"
    if answer:
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]

    grown = rss_kib(d.proc.pid) - before
    assert grown < 10 * 1024, f"the daemon grew by {grown} KiB"
    assert d.get("/healthz").status_code == 200


def test_a_body_over_the_limit_is_refused_with_a_token_too(daemon: StartDaemon) -> None:
    d = daemon(quiet(max_body_bytes=4096))
    big = {"name": "x" * 100, "devices": ["gpu0"] * 1000}
    refused = d.call("POST", "/v1/jobs", json=big)
    assert refused.status_code == 413
    assert refused.json() == {"error": "The request body is larger than api.max_body_bytes = "
                                       "4096 bytes."}

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it comes
        body = json.dumps(big).encode()
        for start in range(0, len(body), 1000):
            yield body[start:start + 1000]

    refused = d.call("POST", "/v1/jobs", content=chunks(),
                     headers={"Content-Type": "application/json"})
    assert refused.status_code == 413
    # a body under the limit is read as before
    made = d.call("POST", "/v1/jobs", json={"name": "small", "mode": "cooperative"})
    assert made.status_code == 201, made.text


# ---- slow requests -------------------------------------------------------------------


def test_a_request_sent_by_halves_is_closed_after_the_header_timeout(
        daemon: StartDaemon) -> None:
    d = daemon(quiet(header_timeout="1s"))
    half_headers = connect(d)
    half_headers.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    half_body = connect(d)
    half_body.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                      f"{d.token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
                      f"\r\n{{\"name\"".encode())
    # a keep-alive connection that starts a second request and stops: a byte received
    # cancels uvicorn's keep-alive timeout, never this one
    second = connect(d)
    second.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert second.recv(65536).startswith(b"HTTP/1.1 200 ")
    second.sendall(b"GET /heal")
    for sock in (half_headers, half_body, second):
        with sock:
            assert closed_by_server(sock)
    assert d.get("/healthz").status_code == 200


# ---- connections ---------------------------------------------------------------------


def unix_client(path: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)),
                        base_url="http://governor", timeout=30)


@pytest.mark.skipif(not ROOT, reason="setting a power limit needs root")
def test_a_connection_flood_leaves_the_unix_socket_and_the_power_cap_alone(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path, c_nvml: CNvmlState,
        children: list[subprocess.Popen[bytes]], short_dir: Path) -> None:
    gpus = {"gpus": [h100(0, temperature=60)]}
    c_nvml.write(gpus)
    rule = {"name": "cap", "metric": "gpu_temperature_celsius", "above": 80.0, "for": 0,
            "clear_below": 75.0, "action": "power_cap", "power_cap_watts": 250}
    sock_path = short_dir / "governor.sock"
    d = daemon(config(sys_tree, proc_tree, rule, api={
        "socket": str(sock_path), "max_connections": 20, "header_timeout": "5m"}),
        c_nvml=c_nvml)
    d.register(name="on-gpu0", pid=spawn(children), devices=["gpu0"])

    flood: list[socket.socket] = []
    try:
        # the TCP listener's room, filled with connections that send nothing; the
        # daemon may still be closing the health checks' own, so more are opened until
        # one is turned away
        refused = None
        for _ in range(200):
            sock = connect(d)
            ready, _, _ = select.select([sock], [], [], 0.5)
            if ready and closed_by_server(sock):
                refused = sock
                break
            flood.append(sock)
        assert refused is not None, "no connection was ever turned away"
        refused.close()
        assert 20 <= len(flood) <= 40, len(flood)
        another = connect(d)
        with another:
            assert closed_by_server(another), "one more is closed at once"

        with unix_client(sock_path) as local:
            assert local.get("/healthz").status_code == 200, "the unix socket has its own room"
            round_now = local.get("/v1/status").json()["sequence"]
            gpus["gpus"][0]["temperature"] = 95
            c_nvml.write(gpus)
            eventually(lambda: c_nvml.limits() == {0: 250000}, timeout=CLOSE_WAIT,
                       what="the hot GPU capped while the TCP listener is full")
            capped = [e for e in local.get("/v1/events").json()["events"]
                      if e["what"] == "power_cap"]
            assert capped and capped[0]["round"] <= round_now + 2, (
                f"capped in round {capped[0]['round'] if capped else None}, heated after "
                f"round {round_now}")
            assert local.get("/healthz").status_code == 200
    finally:
        for sock in flood:
            sock.close()
    # the room is given back
    eventually(lambda: _healthy(d), timeout=CLOSE_WAIT, what="TCP answers again")


def _healthy(d: DaemonProcess) -> bool:
    try:
        return d.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False


# ---- names ---------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("name", "evil\nINFO governor.actions: {\"action\": \"pause\"}"),
    ("name", "\x1b[2Jcleared"),
    ("name", "right\u202eto left"),
    ("scheduler_id", "123\r"),
    ("cgroup", "/sys/fs/cgroup/x\n"),
    ("devices", ["gpu0", "gpu\x07"]),
])
def test_control_characters_in_a_registration_are_refused_naming_the_field(
        daemon: StartDaemon, field: str, value: Any) -> None:
    d = daemon(quiet())
    body = {"name": "fine", "mode": "cooperative", field: value}
    if field == "scheduler_id":
        body["source"] = "slurm"
    if field == "cgroup":
        body["mode"] = "cgroup"
    refused = d.call("POST", "/v1/jobs", json=body)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error.startswith(f"Invalid request: {field}"), error
    assert "must not contain a control character (U+" in error
    assert d.get("/v1/jobs").json() == []


# ---- audit-log reads -----------------------------------------------------------------


def write_audit(state_dir: Path, count: int) -> list[float]:
    """A big audit log (about 1 KB an event), as a daemon that ran a while leaves it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    times = [1_600_000_000.0 + i for i in range(count)]
    padding = "r" * 900
    with open(state_dir / "audit.jsonl", "w") as f:
        for seq, when in enumerate(times, 1):
            f.write(json.dumps({"time": when, "seq": seq, "who": "rule old", "what": "pause",
                                "job": None, "why": {"reasons": [padding], "readings": []},
                                "round": seq}) + "\n")
    return times


def stalled_reader(d: DaemonProcess) -> socket.socket:
    """A client that asks for a long answer and reads none of it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(CLOSE_WAIT)
    sock.connect(("127.0.0.1", d.port))
    sock.sendall(b"GET /v1/events?limit=10000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def test_audit_reads_in_flight_never_hold_up_a_pause(
        daemon: StartDaemon, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    times = write_audit(tmp_path / "state", 12_000)
    d = daemon({**QUIET, "daemon": {"interval": 0.25, "state_dir": str(tmp_path / "state")},
                "audit": {"max_bytes": 100 * MiB}})
    job = d.register(name="worker", pid=spawn(children))

    readers: list[socket.socket] = []
    try:
        refusal = None
        for _ in range(32):  # more readers until one is refused
            readers.append(stalled_reader(d))
            probe = d.get("/v1/events", params={"limit": 1})
            if probe.status_code == 503:
                refusal = probe
                break
            assert probe.status_code == 200, probe.text
        assert refusal is not None, f"{len(readers)} reads in flight and none refused"
        assert refusal.json() == {"error": "4 reads of the audit log are in flight already; "
                                           "try again in a moment."}
        assert refusal.headers["retry-after"] == "1"

        # with every read's place taken, a change is answered and applied
        paused = d.call("POST", f"/v1/jobs/{job['id']}/pause")
        assert paused.status_code == 200, paused.text
        assert paused.json()["state"] == "paused"
        assert state(job["pid"]) == "T"
        assert d.get("/healthz").status_code == 200
    finally:
        for sock in readers:
            sock.close()

    # the places come back; reads by time find the right events, oldest first
    def answered() -> bool:
        return d.get("/v1/events", params={"limit": 1}).status_code == 200

    eventually(answered, timeout=CLOSE_WAIT, what="reads answered again")
    page = d.get("/v1/events", params={"since": times[-4], "limit": 10}).json()["events"]
    assert [e["time"] for e in page[:3]] == times[-3:]
    assert [e["what"] for e in page[3:5]] == ["start", "register"]
    assert "pause" in [e["what"] for e in page[5:]]
    assert [e["seq"] for e in page] == sorted(e["seq"] for e in page)
    first = d.get("/v1/events", params={"limit": 2}).json()["events"]
    assert [e["seq"] for e in first] == [1, 2]
    resumed = d.call("POST", f"/v1/jobs/{job['id']}/resume")
    assert resumed.status_code == 200 and state(job["pid"]) != "T"


def test_readers_that_never_read_are_cut_off(daemon: StartDaemon, tmp_path: Path) -> None:
    """Four clients ask for long answers and never read them: they hold every place for
    SEND_TIMEOUT (10 s) at most, not for as long as they stay connected."""
    write_audit(tmp_path / "state", 12_000)
    d = daemon({**QUIET, "daemon": {"interval": 0.25, "state_dir": str(tmp_path / "state")},
                "audit": {"max_bytes": 100 * MiB}})
    readers: list[socket.socket] = []
    try:
        for _ in range(32):
            readers.append(stalled_reader(d))
            if d.get("/v1/events", params={"limit": 1}).status_code == 503:
                break
        else:
            raise AssertionError("the stalled readers never took every place")

        def answered() -> bool:
            return d.get("/v1/events", params={"limit": 1}).status_code == 200

        # the stalled clients are still connected, reading nothing
        eventually(answered, timeout=CLOSE_WAIT, what="reads answered again")
    finally:
        for sock in readers:
            sock.close()


def hold_connections(path: Path, uid: int, count: int) -> tuple[int, int, int]:
    """A child running as `uid` that opens `count` connections to the unix socket and
    holds them until its pipe closes: (its pid, the pipe to close, how many of them the
    daemon closed at once)."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(ready_r)
            os.close(hold_w)
            os.setgid(uid)
            os.setuid(uid)
            held, closed = [], 0
            for _ in range(count):
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(str(path))
                held.append(sock)
            for sock in held:
                ready, _, _ = select.select([sock], [], [], 1.0)
                if ready and sock.recv(1) == b"":
                    closed += 1
            os.write(ready_w, f"{closed}\n".encode())
            os.read(hold_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    closed = int(os.read(ready_r, 64).decode())
    os.close(ready_r)
    return child, hold_w, closed


@pytest.mark.skipif(not ROOT, reason="playing another uid needs root")
def test_one_user_cannot_fill_the_unix_socket(daemon: StartDaemon, short_dir: Path) -> None:
    """A member of the socket's group opens connections until the daemon refuses them:
    they get `api.max_connections_per_user`, another user still gets in, and root is
    always let in, even with the socket's whole room taken."""
    sock_path = short_dir / "governor.sock"
    daemon(quiet(socket=str(sock_path), max_connections=8, max_connections_per_user=5,
                     header_timeout="5m"))
    open_to_others(sock_path)
    holders: list[tuple[int, int]] = []
    try:
        pid, pipe, closed = hold_connections(sock_path, NOBODY, 7)
        holders.append((pid, pipe))
        assert closed == 2, f"nobody holds 5 of its 7 connections ({closed} were closed)"
        pid, pipe, closed = hold_connections(sock_path, NOBODY - 1, 4)
        holders.append((pid, pipe))
        assert closed == 1, "another user gets the socket's room that is left (8 - 5)"
        with unix_client(sock_path) as local:
            assert local.get("/healthz").status_code == 200, "root is always let in"
        pid, pipe, closed = hold_connections(sock_path, NOBODY, 1)
        holders.append((pid, pipe))
        assert closed == 1, "nobody's sixth is closed at once"
    finally:
        for pid, pipe in holders:
            os.close(pipe)
            os.kill(pid, signal.SIGKILL)  # a later child holds an earlier one's pipe too
            os.waitpid(pid, 0)
    eventually(lambda: unix_request(sock_path, "GET", "/healthz", as_uid=NOBODY)[0] == 200,
               timeout=CLOSE_WAIT, what="nobody's room given back")
