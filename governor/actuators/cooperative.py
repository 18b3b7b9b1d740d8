"""Cooperative jobs hold themselves: the actuator sends nothing.

The controller publishes the directive; the job's client reads it (long-polling
`GET /v1/jobs/{id}/directive?wait=`) and pauses or slows between its own steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from governor.jobs.model import Directive, Job, Mode

if TYPE_CHECKING:
    from governor.actuators.modes import ModeContext


class CooperativeActuator:
    mode = Mode.COOPERATIVE

    def attach(self, job: Job) -> None:
        pass

    def apply(self, job: Job, directive: Directive) -> None:
        pass

    def detach(self, job: Job) -> None:
        pass

    def close(self) -> None:
        pass


def from_context(_: ModeContext) -> CooperativeActuator:
    """The cooperative mode's entry in governor/actuators/modes.py."""
    return CooperativeActuator()
