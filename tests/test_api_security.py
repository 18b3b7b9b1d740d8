"""Transport security end to end: the Host check, TLS, and refusing an unguarded listener.

Real daemons, a real certificate made by the `openssl` CLI, real sockets: a browser tricked
by DNS rebinding sends a foreign Host and is refused; https is verified against the
daemon's own certificate; plain http to a TLS listener gets nowhere; the unix socket stays
plain HTTP; and a listener the network can reach without a token never starts.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from governor.api.hosts import HostCheck, host_of
from tests.support.daemon import DaemonProcess, free_port, to_toml

StartDaemon = Callable[..., DaemonProcess]
QUIET = {"daemon": {"interval": 0.25}, "sources": {"nvml": "off"}}


def config(**api: object) -> dict[str, object]:
    return {**QUIET, "api": api}


def unix_get(socket_path: Path, path: str, host: str) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(socket_path))
    with httpx.Client(transport=transport, base_url=f"http://{host}", timeout=10) as client:
        return client.get(path)


# ---- the Host check ----------------------------------------------------------------------


@pytest.mark.parametrize(("header", "host"), [
    ("localhost:9474", "localhost"), ("Example.COM.", "example.com"), ("[::1]:9474", "::1"),
    ("::1", "::1"), ("127.0.0.1", "127.0.0.1"), ("", "")])
def test_host_of(header: str, host: str) -> None:
    assert host_of(header) == host


def test_host_patterns() -> None:
    check = HostCheck(app=None, allowed=["gpu1.example", "*.lab.example"])  # type: ignore[arg-type]
    assert check.allows("gpu1.example:9474") and check.allows("GPU1.example")
    assert check.allows("a.lab.example") and not check.allows("lab.example")
    assert check.allows("10.1.2.3:9474") and check.allows("[fe80::1]:80"), "addresses pass"
    assert not check.allows("evil.example") and not check.allows("")
    assert HostCheck(app=None, allowed=["*"]).allows("evil.example")  # type: ignore[arg-type]


def test_a_foreign_host_is_refused_with_a_json_error(daemon: StartDaemon,
                                                     short_dir: Path) -> None:
    sock = short_dir / "governor.sock"
    d = daemon(config(socket=str(sock)))
    refused = d.get("/v1/status", headers={"Host": "evil.example"})
    assert refused.status_code == 400
    assert refused.json() == {"error": "The Host header 'evil.example' names no host this "
                                       "daemon answers for (api.allowed_hosts)."}
    changing = d.call("POST", "/v1/jobs", json={"name": "x"}, headers={"Host": "evil.example"})
    assert changing.status_code == 400, "refused before anything else is looked at"
    for host in ("localhost", f"localhost:{d.port}", f"127.0.0.1:{d.port}", "[::1]"):
        assert d.get("/healthz", headers={"Host": host}).status_code == 200, host
    # the unix socket answers whatever the Host: no browser can reach it
    assert unix_get(sock, "/healthz", "evil.example").status_code == 200
    assert unix_get(sock, "/v1/jobs", "governor").json() == []
    assert d.cli("jobs").returncode == 0


def test_allowed_hosts_replace_the_defaults(daemon: StartDaemon) -> None:
    d = daemon(config(allowed_hosts=["gpu1.example"]))
    assert d.get("/healthz", headers={"Host": "gpu1.example"}).status_code == 200
    assert d.get("/healthz", headers={"Host": "localhost"}).status_code == 400
    assert d.get("/healthz").status_code == 200, "an address is no DNS rebinding"
    open_to_all = daemon(config(allowed_hosts=["*"]))
    assert open_to_all.get("/healthz", headers={"Host": "evil.example"}).status_code == 200


# ---- TLS ---------------------------------------------------------------------------------


def make_certificate(directory: Path, name: str = "governor") -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key),
         "-out", str(cert), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60)
    return cert, key


def start_tls(daemon: StartDaemon, cert: Path, key: Path, **api: object) -> DaemonProcess:
    d = daemon(config(tls_cert=str(cert), tls_key=str(key), **api), wait=False)
    d.url = f"https://127.0.0.1:{d.port}"
    verify = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 20
    while True:
        assert d.proc is not None
        assert d.proc.poll() is None, f"the daemon exited:\n{d.log()}"
        try:
            if httpx.get(f"{d.url}/healthz", verify=verify, timeout=1).status_code == 200:
                return d
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no https answer:\n{d.log()}"
        time.sleep(0.05)


def test_tls_serves_https_verified_against_the_certificate(daemon: StartDaemon,
                                                           tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    d = start_tls(daemon, cert, key)
    verify = ssl.create_default_context(cafile=str(cert))
    assert httpx.get(f"{d.url}/healthz", verify=verify).json() == {"status": "ok"}
    assert f"serving /metrics, /healthz and /v1 on https://127.0.0.1:{d.port}" in d.log()
    registered = d.cli("register", "--name", "over-tls", "--cooperative")
    assert registered.returncode == 0, registered.stderr
    listed = d.cli("jobs")
    assert listed.returncode == 0, listed.stderr
    assert "over-tls" in listed.stdout
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{d.port}/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{d.url}/healthz", timeout=5)


def test_the_cli_verifies_against_tls_ca(daemon: StartDaemon, tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    stranger, _ = make_certificate(tmp_path, "stranger")
    d = start_tls(daemon, cert, key, tls_ca=str(stranger))
    result = d.cli("jobs")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"governor: TLS with the governor at https://127.0.0.1:{d.port} failed: "
        "CERTIFICATE_VERIFY_FAILED (check api.tls_ca and api.tls_cert)"]


def test_the_unix_socket_stays_plain_http_under_tls(daemon: StartDaemon, tmp_path: Path,
                                                    short_dir: Path) -> None:
    cert, key = make_certificate(tmp_path)
    sock = short_dir / "governor.sock"
    d = start_tls(daemon, cert, key, socket=str(sock))
    assert unix_get(sock, "/healthz", "governor").json() == {"status": "ok"}
    registered = d.cli("register", "--name", "over-the-socket", "--cooperative")
    assert registered.returncode == 0, registered.stderr


def test_a_bad_key_is_one_line_at_start(tmp_path: Path) -> None:
    cert, _ = make_certificate(tmp_path)
    _, stranger_key = make_certificate(tmp_path, "stranger")
    path = tmp_path / "governor.toml"
    path.write_text(to_toml(config(listen=f"127.0.0.1:{free_port()}", tls_cert=str(cert),
                                   tls_key=str(stranger_key),
                                   token_file=str(tmp_path / "token"))))
    result = run_daemon(path, tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"governor: api.tls_cert / api.tls_key: cannot load {cert} with {stranger_key}: "
        "KEY_VALUES_MISMATCH")


# ---- who may listen where ----------------------------------------------------------------


def run_daemon(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "governor", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def test_a_network_listener_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "governor.toml"
    path.write_text(to_toml(config(listen=f"0.0.0.0:{port}", token_file="",
                                   allow_unauthenticated=True)))
    result = run_daemon(path, tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("governor:")]
    assert errors == [f"governor: api.listen = '0.0.0.0:{port}' is reachable from the "
                      'network, but api.token_file = "": set a token file, or listen on '
                      "127.0.0.1"]
    assert "Traceback" not in result.stderr


def test_a_network_listener_without_tls_starts_with_a_warning(daemon: StartDaemon) -> None:
    port = free_port()
    d = daemon(config(listen=f"0.0.0.0:{port}"), wait=False)
    d.port, d.url = port, f"http://127.0.0.1:{port}"
    d.wait_healthy()
    assert (f"WARNING governor.service.daemon: api.listen = '0.0.0.0:{port}' is reachable from the "
            "network without TLS") in d.log()
