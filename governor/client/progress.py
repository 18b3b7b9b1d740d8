"""A cooperative job's progress, as its client reports it with each directive poll.

Every value is a cumulative total since the job registered, so a lost or repeated poll
is harmless: the daemon keeps the latest report and ignores a value that goes backwards
(a poll overtaken by a newer one). The histogram's buckets are fixed here, shared by
the client that counts and the daemon that exposes them, so no poll has to name them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

#: upper bounds, in seconds, of the step-duration histogram (governor_job_step_seconds);
#: the client reports one cumulative count per bound, the last (+Inf) being every step
STEP_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, math.inf)
#: the largest count or total accepted: floats hold every integer up to it exactly
MAX_COUNT = 2**53
#: the largest step_seconds accepted (about 285 million years of steps)
MAX_SECONDS = 1e16


def bucket_label(bound: float) -> str:
    """The `le` label of a bound, as Prometheus writes it."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def parse_buckets(text: str) -> tuple[int, ...]:
    """The cumulative counts of `step_buckets=`; ValueError with one sentence if they are
    not one whole number per bound of STEP_BUCKETS, never decreasing."""
    parts = text.split(",")
    if len(parts) != len(STEP_BUCKETS):
        raise ValueError(
            f"step_buckets needs {len(STEP_BUCKETS)} comma-separated counts, one per bound "
            f"({', '.join(bucket_label(b) for b in STEP_BUCKETS)}), not {len(parts)}")
    counts = []
    for part in parts:
        if not part.strip().isdigit():
            raise ValueError(f"step_buckets: {part!r} is not a whole number")
        count = int(part)
        if count > MAX_COUNT:
            raise ValueError(f"step_buckets: {count} is more than {MAX_COUNT}")
        counts.append(count)
    if any(later < earlier for earlier, later in itertools.pairwise(counts)):
        raise ValueError("step_buckets are cumulative, so they never decrease")
    return tuple(counts)


@dataclass(frozen=True, slots=True)
class ProgressReport:
    """What one poll carried; None where a value was not sent."""

    steps: int | None = None
    step_seconds: float | None = None
    step_buckets: tuple[int, ...] | None = None
    deferrals: int | None = None

    @property
    def empty(self) -> bool:
        return (self.steps is None and self.step_seconds is None
                and self.step_buckets is None and self.deferrals is None)

    def problem(self) -> str | None:
        """Why the values cannot belong together, or None. Each on its own is checked
        where it is parsed."""
        if self.step_buckets is not None:
            if self.step_seconds is None:
                return "step_buckets needs step_seconds (the sum of the step durations) beside it."
            if self.steps is not None and self.step_buckets[-1] != self.steps:
                return (f"The last of step_buckets (+Inf, every step) is "
                        f"{self.step_buckets[-1]}, but steps is {self.steps}.")
        return None

    def as_params(self) -> dict[str, Any]:
        """The query parameters of a directive poll that carries this report."""
        params: dict[str, Any] = {}
        if self.steps is not None:
            params["steps"] = self.steps
        if self.step_seconds is not None:
            params["step_seconds"] = repr(float(self.step_seconds))
        if self.step_buckets is not None:
            params["step_buckets"] = ",".join(str(c) for c in self.step_buckets)
        if self.deferrals is not None:
            params["deferrals"] = self.deferrals
        return params


@dataclass(frozen=True, slots=True)
class Progress:
    """The latest totals a job reported; what the metrics and /v1/jobs show."""

    steps: int = 0
    #: the sum of step durations; None until reported
    step_seconds: float | None = None
    #: cumulative counts per bound of STEP_BUCKETS; None until reported
    step_buckets: tuple[int, ...] | None = None
    deferrals: int = 0
    #: Unix time of the last report that moved something
    reported_at: float | None = None

    def merged(self, report: ProgressReport, now: float) -> Progress:
        """These totals moved on by a report; each value that would go backwards (a late
        poll) is left as it was, and the step histogram moves only as a whole."""
        updated = self
        steps = report.steps
        if steps is None and report.step_buckets is not None:
            steps = report.step_buckets[-1]
        if steps is not None and steps > updated.steps:
            updated = replace(updated, steps=steps)
        if report.step_buckets is not None and report.step_seconds is not None:
            if _not_behind(report.step_buckets, self.step_buckets) and (
                    self.step_seconds is None or report.step_seconds >= self.step_seconds):
                updated = replace(updated, step_buckets=report.step_buckets,
                                  step_seconds=report.step_seconds)
        elif report.step_seconds is not None and (
                self.step_seconds is None or report.step_seconds > self.step_seconds):
            updated = replace(updated, step_seconds=report.step_seconds)
        if report.deferrals is not None and report.deferrals > updated.deferrals:
            updated = replace(updated, deferrals=report.deferrals)
        if updated != self:
            updated = replace(updated, reported_at=now)
        return updated

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "step_seconds": self.step_seconds,
                "step_buckets": list(self.step_buckets) if self.step_buckets else None,
                "deferrals": self.deferrals, "reported_at": self.reported_at}


def _not_behind(new: tuple[int, ...], old: tuple[int, ...] | None) -> bool:
    return old is None or all(n >= o for n, o in zip(new, old, strict=True))
