"""The /v1 routes for jobs, rules, directives and reload.

(No `from __future__ import annotations` here: FastAPI must evaluate the route
annotations, which name dependencies local to the router factory.)

Mutating routes are plain `def`s: FastAPI runs them in its thread pool, so the
controller's lock (held while a cgroup freezes) never blocks the event loop. The
directive long-poll is async and waits on an event the controller sets; the progress
a cooperative job reports with it is recorded in the thread pool.
"""

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from governor.actuators.modes import ModeName
from governor.api import models
from governor.api.errors import ApiError
from governor.client.progress import MAX_COUNT, MAX_SECONDS, ProgressReport, parse_buckets
from governor.control.controller import Controller
from governor.jobs.model import Mode
from governor.jobs.registry import Caller, JobRequest
from governor.jobs.sources import SourceName
from governor.text import unprintable

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "The body is not valid JSON, or the Host header names no host "
                         "this daemon answers for (api.allowed_hosts)."},
    401: {"description": "No token, or a wrong one."},
    403: {"description": "Not allowed: changes while no token is configured "
                         "(api.token_file = \"\", api.allow_unauthenticated = false), a "
                         "protected process (pid 1, the governor, its ancestors, kernel "
                         "threads), or another user's process or job."},
    404: {"description": "No such job."},
    409: {"description": "Conflict: already registered, a reused pid, a job that exited."},
    413: {"description": "The body is larger than api.max_body_bytes; refused before it "
                         "is read, and the connection is closed."},
    422: {"description": "A field or query value is invalid, or no process has the pid."},
    429: {"description": "The caller, a user on the unix socket, already has as many jobs "
                         "registered as one user may (jobs.max_per_user)."},
    503: {"description": "Too many reads of the audit log are in flight; try again in a "
                         "moment (Retry-After)."},
}

#: every route can answer this 400: the Host check runs before any of them
HOST_REFUSED: dict[str, Any] = {
    "description": "The Host header names no host this daemon answers for "
                   "(api.allowed_hosts)."}

#: the OpenAPI security requirement of the routes that change something
TOKEN: dict[str, Any] = {"security": [{"bearerToken": []}]}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error responses of a route: `codes`, and the Host check's 400."""
    documented = {400: HOST_REFUSED, **{code: ERRORS[code] for code in codes}}
    return {code: {**documented[code], "model": models.ErrorBody}
            for code in sorted(documented, key=int)}


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=128)
    pid: int | None = Field(default=None, gt=0)
    cgroup: str | None = Field(default=None, min_length=1)
    mode: ModeName | None = None
    devices: list[str] = Field(default_factory=list, max_length=64)
    priority: int = 0
    #: the start time the caller saw for the pid (`pid_started_at` of a job), if any
    pid_started_at: float | None = None
    #: where the job comes from: "api" (the default), "launch", or a scheduler's job
    #: registered by hand ("slurm", from the task prolog), with the scheduler's id
    source: SourceName = "api"
    scheduler_id: str | None = Field(default=None, min_length=1, max_length=128)

    @field_validator("name", "cgroup", "scheduler_id")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        """Names end up in log lines, the audit log and terminals: a newline could forge
        a log line, an escape sequence could rewrite a terminal."""
        if value is not None and (char := unprintable(value)) is not None:
            raise ValueError(f"must not contain a control character ({char})")
        return value

    @field_validator("devices")
    @classmethod
    def _printable_devices(cls, value: list[str]) -> list[str]:
        for device in value:
            if (char := unprintable(device)) is not None:
                raise ValueError(f"must not contain a control character ({char})")
        return value


class DirectiveWatch:
    """Wakes long-polling directive requests when the controller changes a directive."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def _current(self) -> asyncio.Event:
        if self._event is None:
            self._loop = asyncio.get_running_loop()
            self._event = asyncio.Event()
        return self._event

    def notify(self, _job_id: str, _version: int) -> None:
        """Called on the controller's thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._event is not None:
            self._event.set()
        self._event = asyncio.Event()

    async def until(self, changed: Callable[[], bool], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not changed():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._current().wait(), remaining)
            except TimeoutError:
                return


def progress_report(steps: int | None, step_seconds: float | None, step_buckets: str | None,
                    deferrals: int | None) -> ProgressReport:
    """The progress a directive poll carries; ApiError 422 with one sentence if its values
    do not fit together."""
    buckets = None
    if step_buckets is not None:
        try:
            buckets = parse_buckets(step_buckets)
        except ValueError as exc:
            raise ApiError(422, f"Invalid request: {exc}.") from None
    report = ProgressReport(steps, step_seconds, buckets, deferrals)
    problem = report.problem()
    if problem is not None:
        raise ApiError(422, f"Invalid request: {problem}")
    return report


def job_router(controller: Controller, authenticate: Callable[..., Caller]) -> APIRouter:
    router = APIRouter(prefix="/v1")
    Writer = Annotated[Caller, Depends(authenticate)]
    watch = DirectiveWatch()
    controller.add_listener(watch.notify)

    @router.get("/jobs", summary="The registered jobs", response_model=list[models.Job],
                responses=errors())
    async def jobs() -> models.AsBuilt:
        return models.AsBuilt([job.as_json() for job in controller.view.jobs])

    @router.post("/jobs", status_code=201, summary="Register a job", response_model=models.Job,
                 responses=errors(400, 401, 403, 409, 413, 422, 429), openapi_extra=TOKEN)
    def register(body: JobIn, caller: Writer) -> models.AsBuilt:
        request = JobRequest(
            name=body.name, pid=body.pid, cgroup=body.cgroup,
            mode=Mode(body.mode) if body.mode else None, devices=tuple(body.devices),
            priority=body.priority, pid_started_at=body.pid_started_at,
            source=body.source, scheduler_id=body.scheduler_id,
        )
        return models.AsBuilt(controller.register(request, caller), status_code=201)

    @router.get("/jobs/{job_id}", summary="One job", response_model=models.Job,
                responses=errors(404))
    async def job(job_id: str) -> models.AsBuilt:
        return models.AsBuilt(controller.job(job_id).as_json())

    @router.delete("/jobs/{job_id}", status_code=204, response_class=Response,
                   summary="Forget a job, resuming it first", responses=errors(401, 403, 404),
                   openapi_extra=TOKEN)
    def unregister(job_id: str, caller: Writer) -> Response:
        controller.unregister(job_id, caller)
        return Response(status_code=204)

    @router.post("/jobs/{job_id}/pause", summary="Operator hold: pause until resumed",
                 response_model=models.Job, responses=errors(401, 403, 404, 409),
                 openapi_extra=TOKEN)
    def pause(job_id: str, caller: Writer) -> models.AsBuilt:
        return models.AsBuilt(controller.hold(job_id, caller, held=True))

    @router.post("/jobs/{job_id}/resume", summary="Lift the operator hold (rules still apply)",
                 response_model=models.Job, responses=errors(401, 403, 404, 409),
                 openapi_extra=TOKEN)
    def resume(job_id: str, caller: Writer) -> models.AsBuilt:
        return models.AsBuilt(controller.hold(job_id, caller, held=False))

    @router.get("/jobs/{job_id}/directive", summary="What the job should do; long-polls",
                response_model=models.Directive, responses=errors(403, 404, 422))
    async def directive(
        job_id: str,
        request: Request,
        wait: Annotated[float, Query(ge=0, le=300, description="seconds to wait for a change")]
        = 0,
        since: Annotated[int | None, Query(ge=0, description="the version last seen")] = None,
        steps: Annotated[int | None, Query(
            ge=0, le=MAX_COUNT, description="progress: steps done since the job registered "
                                            "(a total: a lost or repeated poll is harmless)")]
        = None,
        step_seconds: Annotated[float | None, Query(
            ge=0, le=MAX_SECONDS, allow_inf_nan=False,
            description="progress: the sum of the durations of those steps, in seconds")]
        = None,
        step_buckets: Annotated[str | None, Query(
            max_length=200, pattern=r"^[0-9]+(,[0-9]+)*$",
            description="progress: cumulative step counts per bound of the step-duration "
                        "histogram (0.01, 0.05, 0.1, 0.5, 1, 5, 30 s, +Inf), comma-separated; "
                        "needs step_seconds")] = None,
        deferrals: Annotated[int | None, Query(
            ge=0, le=MAX_COUNT, description="progress: pauses and slows put off inside "
                                            "critical sections")] = None,
    ) -> models.AsBuilt:
        found = controller.directive(job_id)
        report = progress_report(steps, step_seconds, step_buckets, deferrals)
        if the_jobs_own(request, controller.job(job_id).owner_uid):
            controller.polled(job_id, wait)
        elif not report.empty:
            raise ApiError(403, "Progress is taken only from the job's owner: poll over the "
                                "unix socket as its user, or with the token.")
        if not report.empty:
            # in the thread pool: the controller's lock may be held by a slow freeze
            await asyncio.to_thread(controller.report_progress, job_id, report)
        if wait > 0:
            baseline = found.version if since is None else since

            def changed() -> bool:
                now = controller.view.directives.get(job_id)
                return now is None or now.version != baseline

            await watch.until(changed, wait)
            found = controller.directive(job_id)
        return models.AsBuilt({**found.as_json(), "version": found.version,
                               "max_defer": controller.max_defer})

    def the_jobs_own(request: Request, owner_uid: int | None) -> bool:
        """Whether a directive poll comes from the job itself: the token, root, or its
        owner over the unix socket. Anyone may read a directive; only these polls keep a
        cooperative job alive and carry its progress, which would otherwise let anyone
        pin its counters, write deferral events in its name, or keep a dead job from
        expiring."""
        try:
            caller = authenticate(request)
        except ApiError:
            return False
        return not caller.restricted or caller.uid == owner_uid

    @router.get("/rules", summary="Every rule's series and their state",
                response_model=list[models.RuleSeries], responses=errors())
    async def rules() -> models.AsBuilt:
        return models.AsBuilt(list(controller.view.rules))

    return router
