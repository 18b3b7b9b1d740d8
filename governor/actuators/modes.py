"""Every way to hold a job, in one table, as gunicorn lists its workers.

A mode is an actuator class, what names a job held that way (a pid, a cgroup, nothing),
which of those it is the default for, and the hold kind it writes to the journal with
the function release-all and the guardian undo it with. The daemon builds its actuators
from this table, the registration rules and the REST API's and the CLI's mode values
come from it, and release-all undoes the hold kinds it lists. A new mode is its module,
a member of `Mode` (governor/jobs/model.py) and one entry here.

The table names its code by dotted path and imports it only when used, so that the CLI
can list the modes without loading the actuators.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from governor.jobs.model import Job, Mode

if TYPE_CHECKING:
    from governor.actuators.base import Actuator
    from governor.config import Config
    from governor.safety.journal import Journal

#: what a registration names its job by
Target = Literal["pid", "cgroup", "nothing"]
#: undoes one journalled hold: (fully undone, what was done)
Undo = Callable[[dict[str, Any]], tuple[bool, str]]


@dataclass(frozen=True, slots=True)
class ModeContext:
    """What an actuator may be built with."""

    journal: Journal
    config: Config
    #: pids it must never hold besides the usual ones (the guardian's), asked each time
    protected: Callable[[], tuple[int, ...]]
    #: tells the controller of something that happened to a job outside governor (an
    #: administrator's resume of a suspended Slurm job), to be audited and counted
    report: Callable[[Job, str], None] = lambda job, what: None


@dataclass(frozen=True, slots=True)
class ModeSpec:
    mode: Mode
    #: "module:function" building the actuator from a ModeContext; ActuatorError when the
    #: machine cannot hold jobs this way (the mode is then unavailable, with the reason)
    build: str
    #: what a job held this way may be named by, in the order error messages list them
    targets: tuple[Target, ...]
    #: registrations naming these, without a mode, get this one
    default_for: tuple[Target, ...]
    #: "module:function" undoing the hold this mode journals under its name; None when
    #: it journals none (the job holds itself)
    undo: str | None
    #: one line for `--help` and the API's schema
    summary: str

    def actuator(self, context: ModeContext) -> Actuator:
        factory: Callable[[ModeContext], Actuator] = resolve(self.build)
        return factory(context)


def resolve(path: str) -> Any:
    """The object a "module:name" path names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


MODES: dict[Mode, ModeSpec] = {spec.mode: spec for spec in (
    ModeSpec(Mode.SIGNAL, "governor.actuators.signal:from_context", ("pid", "cgroup"),
             ("pid",), "governor.actuators.signal:undo_checked",
             "SIGSTOP/SIGCONT to the process tree, a duty cycle to slow it"),
    ModeSpec(Mode.CGROUP, "governor.actuators.cgroup:from_context", ("pid", "cgroup"),
             ("cgroup",), "governor.actuators.cgroup:undo_checked",
             "the cgroup freezer to pause, the CPU quota to slow"),
    ModeSpec(Mode.COOPERATIVE, "governor.actuators.cooperative:from_context",
             ("pid", "nothing"), ("nothing",), None,
             "the job polls its directive and holds itself (governor.client.Job)"),
    ModeSpec(Mode.SUSPEND, "governor.actuators.suspend:from_context", ("pid", "cgroup"),
             (), "governor.actuators.suspend:undo_checked",
             "scontrol suspend/resume of a Slurm job, on every node; slowed by a duty cycle"),
)}

#: hold kinds that are not modes: a GPU's power limit, set by the power capper
OTHER_HOLDS: dict[str, str] = {"power_cap": "governor.actuators.gpu_power:undo_checked"}

#: every mode's name, in the table's order: the API's and the CLI's values
MODE_NAMES: tuple[str, ...] = tuple(mode.value for mode in MODES)

if TYPE_CHECKING:
    ModeName = str
else:
    #: the API's field type: a Literal of the table's names, so the OpenAPI schema and
    #: pydantic's checks follow the table
    ModeName = Literal[MODE_NAMES]


def hold_undoers() -> dict[str, Undo]:
    """Hold kind -> its undo, every one imported now (the guardian loads them before the
    daemon can die, so that it acts within milliseconds)."""
    paths = {spec.mode.value: spec.undo for spec in MODES.values() if spec.undo is not None}
    return {kind: resolve(path) for kind, path in {**paths, **OTHER_HOLDS}.items()}


def named_by(pid: int | None, cgroup: str | None) -> Target:
    return "pid" if pid is not None else "cgroup" if cgroup is not None else "nothing"


def default_mode(target: Target) -> Mode:
    return next(spec.mode for spec in MODES.values() if target in spec.default_for)


def refusal(mode: Mode, pid: int | None, cgroup: str | None) -> str | None:
    """Why a job of this mode cannot be named this way, in one sentence; None if it can."""
    spec = MODES[mode]
    given: list[Target] = []
    if pid is not None:
        given.append("pid")
    if cgroup is not None:
        given.append("cgroup")
    if not given and "nothing" not in spec.targets:
        wanted = " or a ".join(t for t in spec.targets if t != "nothing")
        return f"A job in {mode.value} mode needs a {wanted}."
    for target in given:
        if target not in spec.targets:
            allowed = " or ".join("nothing" if t == "nothing" else f"a {t}"
                                  for t in spec.targets)
            return f"A {mode.value} job is named by {allowed}, not a {target}."
    return None
