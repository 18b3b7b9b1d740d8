"""Runs the real daemon (`python -m governor run`) as a subprocess on a free port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from tests.support.c_nvml import CNvmlState

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(config: dict[str, Any]) -> str:
    """Enough TOML for test configs: tables of scalars, and [[rules]]."""
    lines = []
    for section, body in config.items():
        if section == "rules":
            for rule in body:
                lines.append("[[rules]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in rule.items()]
                lines.append("")
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
            lines.append("")
    return "\n".join(lines)


class DaemonProcess:
    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        fake_nvml_state: Path | None = None,
        c_nvml: CNvmlState | None = None,
        prefix: list[str] | None = None,
    ):
        self.workdir = workdir
        #: run before the daemon's command, which it must exec (`unshare --mount ...`),
        #: so that the process started is the daemon
        self.prefix = list(prefix or [])
        self.port = free_port()
        config = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
        config.setdefault("api", {}).setdefault("listen", f"127.0.0.1:{self.port}")
        # a test may bring a daemon back on the port of one it stopped
        self.port = int(str(config["api"]["listen"]).rsplit(":", 1)[1])
        config.setdefault("daemon", {}).setdefault("state_dir", str(workdir / "state"))
        config["api"].setdefault("token_file", str(workdir / "token"))
        self.token_path = Path(config["api"]["token_file"]) if config["api"]["token_file"] else None
        self.config_path = workdir / "governor.toml"
        self.config_path.write_text(to_toml(config))
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(REPO) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env["PYTHONUNBUFFERED"] = "1"
        if fake_nvml_state is not None:
            self.env["GOVERNOR_NVML_MODULE"] = "tests.support.fake_nvml"
            self.env["FAKE_NVML_STATE"] = str(fake_nvml_state)
        if c_nvml is not None:  # the real pynvml, on the C fake's libnvidia-ml.so.1
            self.env.pop("GOVERNOR_NVML_MODULE", None)
            self.env.update(c_nvml.env())
        self.env.update(env or {})
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: run after the daemon stops
        self.cleanups: list[Callable[[], None]] = []
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> DaemonProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "governor", "run", "--config",
                 str(self.config_path)],
                cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        if wait:
            self.wait_healthy()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not healthy after {timeout} s:\n{self.log()}")

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kwargs)

    @property
    def token(self) -> str:
        assert self.token_path is not None
        return self.token_path.read_text().strip()

    def call(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> httpx.Response:
        """A request with the daemon's token (auth=False: without it)."""
        headers = dict(kwargs.pop("headers", {}))
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def register(self, **body: Any) -> dict[str, Any]:
        response = self.call("POST", "/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def cli(self, *args: str, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`governor VERB --config <this daemon's config> ARGS`, as a user would run it;
        `env` adds to the daemon's environment."""
        verb, *rest = args
        return subprocess.run(
            [sys.executable, "-m", "governor", verb, "--config", str(self.config_path), *rest],
            capture_output=True, text=True, timeout=timeout, cwd=self.workdir,
            env={**self.env, **(env or {})})

    def metrics(self) -> str:
        response = self.get("/metrics")
        assert response.status_code == 200, response.text
        return response.text

    def wait_rounds(self, count: int, timeout: float = 20.0) -> None:
        """Wait until `count` more rounds have completed than now."""
        def rounds() -> float:
            for line in self.metrics().splitlines():
                if line.startswith("governor_rounds_total "):
                    return float(line.split()[1])
            return 0.0

        target = rounds() + count
        deadline = time.monotonic() + timeout
        while rounds() < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} rounds in {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        while self.cleanups:
            self.cleanups.pop()()
        return self.proc.returncode

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(check: Callable[[], Any], timeout: float, what: str, d: DaemonProcess) -> Any:
    """The first true value of `check`, polled until `timeout`; fails with the daemon's
    log when there is none."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout} s\n{d.log()[-4000:]}")
