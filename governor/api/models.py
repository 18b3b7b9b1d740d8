"""The shapes the API answers with, as the OpenAPI document states them.

Routes return the dicts the controller and the snapshot already build, unchanged
(`AsBuilt`); these models only describe them. extra="forbid" makes a field that is not
declared here a failure of tests/test_api_schema.py, which checks every response a fuzzer
provokes against them. Fields present only sometimes have a default, so they are not
`required`.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from governor.actuators.modes import ModeName
from governor.jobs.sources import SourceName

_ANY = TypeAdapter(Any)


class AsBuilt(JSONResponse):
    """A body as the controller built it, rendered as FastAPI renders a returned dict
    (pydantic's JSON writer: NaN as null), and never validated against a model."""

    def render(self, content: Any) -> bytes:
        return _ANY.dump_json(content)


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Shape):
    """Every error: one sentence a person can act on."""

    error: str = Field(examples=["There is no job 'ab12cd34'."])


class ReloadRefused(_Shape):
    """A reload that changed nothing, with every problem of the file, each naming its key."""

    error: str
    problems: list[str]


class Healthy(_Shape):
    status: Literal["ok"]


class Unhealthy(_Shape):
    """The sampling loop missed its cadence; `error` says how."""

    status: Literal["unhealthy"]
    error: str


class JobProgress(_Shape):
    """What a cooperative job reported with its directive polls: totals since it
    registered."""

    steps: int
    step_seconds: float | None = Field(description="the sum of the step durations")
    step_buckets: list[int] | None = Field(
        description="cumulative step counts per bound of the step-duration histogram "
                    "(0.01, 0.05, 0.1, 0.5, 1, 5, 30 s, +Inf)")
    deferrals: int = Field(description="holds put off inside critical sections")
    reported_at: float | None = Field(description="Unix time of the last report that "
                                                  "moved something")


class Job(_Shape):
    id: str
    name: str
    pid: int | None
    #: with the pid, the process's identity: a reused pid is never signalled
    pid_started_at: float | None
    cgroup: str | None
    mode: ModeName
    devices: list[str]
    devices_from: Literal["registration", "nvml"] | None
    priority: int
    state: Literal["running", "slowed", "paused", "gone"]
    speed: float
    reasons: list[str]
    held_by_operator: bool
    registered_at: float
    owner_uid: int | None
    gone_at: float | None
    source: SourceName = Field(description="where the job came from: api, launch, or the "
                                           "scheduler whose job it is (slurm)")
    scheduler_id: str | None = Field(description="the scheduler's id for the job (the Slurm "
                                                 "job id); null for api and launch jobs")
    user: str | None = Field(description="the user the job runs as: the scheduler's word "
                                          "for a scheduler's job, else its owner's name")
    outside: Literal["resumed"] | None = Field(
        default=None, description="\"resumed\", present while someone outside governor (an "
                                  "administrator's `scontrol resume`) lets the job run during "
                                  "a pause: state is then running and speed 1, the reasons "
                                  "still the pause's; gone when the pause ends")
    error: str | None = Field(
        default=None, description="present while the job's actuator fails to hold it")
    progress: JobProgress | None = Field(
        default=None, description="present once a cooperative job has reported progress")


class Directive(_Shape):
    state: Literal["run", "slow", "pause"]
    speed: float
    reasons: list[str]
    version: int = Field(description="bumped at every change; pass it as `since`")
    defer: bool = Field(description="whether a cooperative job may put off a pause or slow "
                                    "while inside a critical section; false when a rule "
                                    "holding it says `defer = false`")
    max_defer: float = Field(description="policy.max_defer: the longest, in seconds, a "
                                         "pause or slow may be put off")


class RuleSeries(_Shape):
    name: str
    series: str | None = Field(description="null while the rule has seen no series")
    labels: dict[str, str]
    state: Literal["ok", "pending", "tripped"]
    clearing: bool
    missing: bool
    value: float | None
    since: float | None
    action: Literal["slow", "pause", "power_cap", "hold"]
    metric: str = Field(description="the metric the rule watches, without governor_")
    direction: Literal["above", "below"] | None = Field(
        description="it trips above or below; null for a hold rule")
    threshold: float | None = Field(description="where it trips; null for a hold rule")
    clear_threshold: float | None = Field(
        description="where it clears (the hysteresis line); null for a hold rule")
    target: float | None = Field(default=None, description="hold rules only: the value "
                                 "each series is held at")
    output: float | None = Field(default=None, description="hold rules only: the speed the "
                                 "series' loop asks for (1: not holding back); null while "
                                 "the rule has seen no series")
    via: Literal["speed", "power_limit"] | None = Field(
        default=None, description="hold rules only: what the loop sets")
    enforceable: bool | None = Field(
        default=None, description="power_cap rules and hold rules via power_limit only")
    not_enforceable_because: str | None = Field(
        default=None, description="power_cap (or hold via power_limit) rules that cannot "
        "act here")


class Reloaded(_Shape):
    rules: list[RuleSeries]


class SamplerStatus(_Shape):
    name: str
    state: Literal["ok", "error", "unavailable"]
    up: bool
    duration_seconds: float
    error: str | None
    problems: list[str]
    last_success: float | None
    consecutive_failures: int = Field(
        default=0, description="rounds in a row the sampler failed; 0 while it works")
    retry_at: float | None = Field(
        default=None, description="while it backs off: the Unix time of its next try")


class Reading(_Shape):
    metric: str
    labels: dict[str, str]
    value: float


class AuditStatus(_Shape):
    path: str
    ok: bool = Field(description="false while writes to the audit log fail")
    errors: int
    last_error: str | None
    last_error_at: float | None


class AuditEvent(BaseModel):
    """One line of the audit log. Events of some kinds carry more fields (speed, gpu,
    watts, status, rules...), so more are allowed."""

    model_config = ConfigDict(extra="allow")

    time: float
    seq: int
    who: str
    what: str
    job: dict[str, Any] | None = None
    why: dict[str, Any] | None = None
    round: int | None = None


class Events(_Shape):
    events: list[AuditEvent]


class Status(_Shape):
    samplers: list[SamplerStatus]
    readings: list[Reading]
    sequence: int | None = Field(default=None, description="absent before the first round")
    taken_at: float | None = Field(default=None, description="absent before the first round")
    gpu_pids: dict[str, list[int]] | None = Field(
        default=None, description="GPU index -> pids of its compute processes")
    rules: list[RuleSeries]
    jobs: list[Job]
    power_caps: dict[str, float]
    audit: AuditStatus
