"""Schemathesis against a running daemon's own OpenAPI document, with and without the token.

Every request a fuzzer makes from /openapi.json must get an answer the document promises:
never a 5xx, a documented status, the documented content type, a body that matches the
documented schema. The run is stateless; instead, a hook sends some requests for job ids
that exist, so the routes' success answers are checked too, not only their 404s.

Generated bodies name processes: a hook replaces every `pid` with one of the test's own
sacrificial children, and every `cgroup` with a cgroup the test made, so nothing else on
this machine is ever held. The directive long-poll is capped at 0.2 s to keep the run
short.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.daemon import DaemonProcess
from tests.support.processes import stop

StartDaemon = Callable[..., DaemonProcess]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
#: generated cases per operation and generation mode, beside the coverage phase's
EXAMPLES = 50
#: the longest long-poll a generated directive request may ask for
MAX_WAIT = 0.2
#: cooperative jobs registered up front, so pause, resume, directive and delete also meet
#: jobs that exist
KNOWN_JOBS = 4
#: where cgroup v2 is mounted: beside v1 on a hybrid machine, else alone
CGROUP_V2 = next((p for p in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
                  if (p / "cgroup.controllers").is_file()), None)
CPU_COOL = {"name": "cpu-hot", "metric": "cpu_temperature_celsius", "above": 150.0,
            "action": "pause"}
GPU_CAP = {"name": "gpu-cap", "metric": "gpu_temperature_celsius", "above": 90.0,
           "action": "power_cap", "power_cap_watts": 200.0}
#: a hold rule, so /v1/rules answers with its target and output too
CPU_HOLD = {"name": "cpu-hold", "metric": "cpu_temperature_celsius", "action": "hold",
            "target": 140.0}


@dataclass
class FuzzRun:
    """One run: the daemon, what each request carries, and how many were made."""

    url: str
    headers: dict[str, str]
    pids: list[int]
    cgroup: str | None
    job_ids: list[str]
    statuses: dict[int, int] = field(default_factory=dict)
    #: ids of the jobs the fuzzer registered
    registered: list[str] = field(default_factory=list)
    #: the cgroups the daemon made for them (a pid in cgroup mode gets its own)
    job_cgroups: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())


@pytest.fixture
def sacrifices() -> Iterator[list[int]]:
    """Processes the fuzzer may register, pause and freeze: nothing else may be touched."""
    children = [subprocess.Popen(["sleep", "600"]) for _ in range(3)]
    yield [child.pid for child in children]
    for child in children:
        stop(child)


@pytest.fixture
def sacrificial_cgroup() -> Iterator[str | None]:
    """An empty cgroup v2 for the fuzzer to register, or None where none can be made."""
    if os.geteuid() != 0 or CGROUP_V2 is None:
        yield None
        return
    path = CGROUP_V2 / f"governor-schema-test-{os.getpid()}"
    path.mkdir(exist_ok=True)
    yield str(path)
    for _ in range(50):
        try:
            path.rmdir()
            break
        except FileNotFoundError:
            break
        except OSError:
            time.sleep(0.1)


@pytest.fixture(params=["with token", "without token"])
def fuzz_run(request: pytest.FixtureRequest, sacrifices: list[int],
             sacrificial_cgroup: str | None, daemon: StartDaemon, sys_tree: Path,
             proc_tree: Path) -> Iterator[FuzzRun]:
    d = daemon({
        "daemon": {"interval": 0.25},
        "sources": {"sysfs_root": str(sys_tree), "procfs_root": str(proc_tree),
                    "nvml": "off"},
        "rules": [CPU_COOL, GPU_CAP, CPU_HOLD],
    })
    job_ids = [d.register(name=f"known-{i}")["id"] for i in range(KNOWN_JOBS)]
    headers = {"Authorization": f"Bearer {d.token}"} if request.param == "with token" else {}
    run = FuzzRun(d.url, headers, sacrifices, sacrificial_cgroup, job_ids)
    yield run
    print(f"\nschemathesis, {request.param}: {run.requests} requests, "
          f"{run.requests * len(CHECKS)} checks; by status: "
          f"{dict(sorted(run.statuses.items()))}; {len(run.registered)} jobs registered, "
          f"{len(run.job_cgroups)} in cgroups the daemon made")
    # A pid registered in cgroup mode got cgroups of its own: unregistering removes them.
    made = [Path(p) for p in run.job_cgroups] + [
        path for job_id in run.registered
        for path in Path("/sys/fs/cgroup").glob(f"*/governor-{job_id}")]
    for job in d.get("/v1/jobs").json():
        d.call("DELETE", f"/v1/jobs/{job['id']}")
    left = [str(path) for path in made if path.exists()]
    assert not left, f"cgroups left behind: {left}"


def make_safe(case: Case, run: FuzzRun) -> None:
    """Point every generated pid and cgroup at the test's own, and cap the long-poll."""
    body = case.body
    if isinstance(body, dict):
        body = dict(body)
        if "pid" in body:
            seed = body["pid"] if isinstance(body["pid"], int) else len(str(body["pid"]))
            body["pid"] = run.pids[seed % len(run.pids)]
        if "cgroup" in body:
            if run.cgroup is None:
                del body["cgroup"]
            else:
                body["cgroup"] = run.cgroup
        case.body = body
    wait = (case.query or {}).get("wait")
    if isinstance(wait, int | float) and not isinstance(wait, bool) and MAX_WAIT < wait <= 300:
        case.query = {**case.query, "wait": MAX_WAIT}


def can_be_invalid(operation: Any) -> bool:
    """Whether anything this operation takes can be sent invalid: a body, a query, the
    token. (A free string in the path cannot; hypothesis would find no negative case.)"""
    raw = operation.definition.raw
    return bool(raw.get("requestBody") or raw.get("security")
                or any(p.get("in") == "query" for p in raw.get("parameters", [])))


def load_schema(run: FuzzRun) -> Any:
    """The daemon's own document, with a hook that sends some requests to jobs that
    exist (stateless: the ids are fixed before the run)."""
    schema = schemathesis.openapi.from_url(f"{run.url}/openapi.json")

    @schema.hook
    def flatmap_path_parameters(context: schemathesis.HookContext,
                                path_parameters: Any) -> st.SearchStrategy[Any]:
        if not isinstance(path_parameters, dict) or "job_id" not in path_parameters:
            return st.just(path_parameters)
        known = st.sampled_from(run.job_ids).map(
            lambda job_id: {**path_parameters, "job_id": job_id})
        return st.one_of(st.just(path_parameters), known)

    return schema


def test_every_answer_is_as_documented(fuzz_run: FuzzRun) -> None:
    run = fuzz_run
    schema = load_schema(run)

    def check(case: Case) -> None:
        make_safe(case, run)
        response = case.call(headers=run.headers, timeout=10)
        run.statuses[response.status_code] = run.statuses.get(response.status_code, 0) + 1
        if response.status_code == 201:
            job = response.json()
            run.registered.append(job["id"])
            if job["cgroup"] and Path(job["cgroup"]).name == f"governor-{job['id']}":
                run.job_cgroups.append(job["cgroup"])
        case.validate_response(response, checks=CHECKS, headers=run.headers)

    modes = list(GenerationMode)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:
        for case in schema.iter_coverage_cases(
                operation, generation_modes=modes, generation_config=schema.config.generation):
            check(case)
        for mode in modes if can_be_invalid(operation) else [GenerationMode.POSITIVE]:
            @hypothesis.given(operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck))
            def fuzz(case: Case) -> None:
                check(case)

            fuzz()
    # a run that degenerated (every request refused the same way) would prove little
    expected = {200, 201, 401, 404, 409, 422} if run.headers else {200, 401, 404, 422}
    assert expected <= set(run.statuses), run.statuses


STATUSES = {
    "GET /healthz": ["200", "400", "503"],
    "GET /metrics": ["200", "400"],
    "GET /v1/status": ["200", "400"],
    "GET /v1/jobs": ["200", "400"],
    "POST /v1/jobs": ["201", "400", "401", "403", "409", "413", "422", "429"],
    "GET /v1/jobs/{job_id}": ["200", "400", "404"],
    "DELETE /v1/jobs/{job_id}": ["204", "400", "401", "403", "404"],
    "POST /v1/jobs/{job_id}/pause": ["200", "400", "401", "403", "404", "409"],
    "POST /v1/jobs/{job_id}/resume": ["200", "400", "401", "403", "404", "409"],
    "GET /v1/jobs/{job_id}/directive": ["200", "400", "403", "404", "422"],
    "GET /v1/rules": ["200", "400"],
    "POST /v1/reload": ["200", "400", "401", "403", "422"],
    "GET /v1/events": ["200", "400", "422", "503"],
}


def test_the_document_states_every_status(daemon: StartDaemon) -> None:
    """Each route lists what it can answer (400 everywhere: the Host check), errors as
    ErrorBody, and none of FastAPI's own HTTPValidationError."""
    document = daemon({"daemon": {"interval": 0.25}}).get("/openapi.json").json()
    statuses = {f"{method.upper()} {path}": sorted(operation["responses"])
                for path, operations in document["paths"].items()
                for method, operation in operations.items()}
    for route, documented in STATUSES.items():
        assert statuses[route] == documented, route
    text = str(document)
    assert "HTTPValidationError" not in text and "ValidationError" not in text
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                schema = answer.get("content", {}).get("application/json", {}).get("schema")
                if status == "204":
                    assert "content" not in answer, f"{method} {path}: 204 has no body"
                elif status.startswith("4") and not (path == "/v1/reload" and status == "422"):
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (
                        f"{method} {path} {status}: {answer}")
                elif status != "200" or path != "/metrics":
                    assert schema is not None, f"{method} {path} {status} has no JSON schema"
            if method != "get":
                assert operation["security"] == [{"bearerToken": []}], f"{method} {path}"
