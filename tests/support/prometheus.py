"""A real Prometheus server (the Debian package's binary) for tests: it scrapes targets
on this machine, evaluates rule files, and answers PromQL over its HTTP API.

Each server has a free port, its own storage directory and a config written for the test;
stop() (or leaving the `with` block) ends it, and its log is kept for failure messages.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.support.daemon import free_port

#: where Debian's `prometheus` package puts the server; $PATH is tried as well
BINARY = "/usr/bin/prometheus"


def prometheus_binary() -> str | None:
    if Path(BINARY).is_file():
        return BINARY
    return shutil.which("prometheus")


class PrometheusServer:
    """One Prometheus, scraping `targets` (host:port) as scrape job `job_name`; `labels`
    gives a target labels of its own (as file_sd does, `node` for instance)."""

    def __init__(self, workdir: Path, targets: Sequence[str], *, job_name: str = "governor",
                 scrape_interval: str = "1s", rule_files: Sequence[Path] = (),
                 labels: Mapping[str, Mapping[str, str]] | None = None):
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("prometheus is not installed (Debian: apt-get install prometheus)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        # JSON is YAML: no YAML writer needed
        self.config_path.write_text(json.dumps({
            "global": {"scrape_interval": scrape_interval,
                       "evaluation_interval": scrape_interval},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": job_name,
                                "static_configs": [
                                    {"targets": [target], "labels": dict((labels or {}).get(
                                        target, {}))} for target in targets]}],
        }, indent=2))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; the `data` of a success, else an AssertionError with
        Prometheus's own error message."""
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: "
                                 f"{body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at the present; the result as a list of series."""
        data = self.api("query", query=expr)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def wait_for(self, expr: str, timeout: float = 30.0, what: str = "") -> list[dict[str, Any]]:
        """Poll until `expr` returns at least one series."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.query(expr)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no series for {expr} after {timeout} s: {what}\n"
                                     f"{self.log()}")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
