"""The modes' table (governor/actuators/modes.py) is the one place a mode is registered:
the API's values, the CLI's choices, the registration rules and release-all's undoers all
come from it."""

from __future__ import annotations

import argparse

import pytest

from governor.actuators import modes
from governor.actuators.modes import MODE_NAMES, MODES, resolve
from governor.api import models
from governor.api.errors import status_of
from governor.api.jobs import JobIn
from governor.cli.main import build_parser
from governor.jobs.errors import RegistrationError, Unacceptable
from governor.jobs.model import Mode
from governor.jobs.registry import JobRequest, resolve_mode
from governor.safety.release import UNDOERS


def mode_choices(parser: argparse.ArgumentParser, verb: str) -> tuple[str, ...]:
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = verbs.choices[verb]
    (option,) = (a for a in sub._actions if "--mode" in a.option_strings)
    assert option.choices is not None
    return tuple(option.choices)


def test_the_api_and_the_cli_take_their_mode_values_from_the_table() -> None:
    assert MODE_NAMES == tuple(m.value for m in MODES) == tuple(m.value for m in Mode)
    incoming = JobIn.model_json_schema()["properties"]["mode"]["anyOf"][0]["enum"]
    outgoing = models.Job.model_json_schema()["properties"]["mode"]["enum"]
    assert tuple(incoming) == tuple(outgoing) == MODE_NAMES
    parser = build_parser()
    assert mode_choices(parser, "register") == mode_choices(parser, "launch") == MODE_NAMES


def test_release_all_undoes_every_hold_kind_the_table_names() -> None:
    journalled = {spec.mode.value for spec in MODES.values() if spec.undo is not None}
    assert set(UNDOERS) == journalled | set(modes.OTHER_HOLDS)
    assert journalled == {"signal", "cgroup", "suspend"}, "a cooperative job holds itself"
    for spec in MODES.values():
        assert callable(resolve(spec.build)), spec


@pytest.mark.parametrize(("pid", "cgroup", "mode"), [
    (42, None, Mode.SIGNAL), (None, "/sys/fs/cgroup/x", Mode.CGROUP),
    (None, None, Mode.COOPERATIVE), (42, "/sys/fs/cgroup/x", Mode.SIGNAL)])
def test_a_registration_without_a_mode_gets_the_tables_default(
        pid: int | None, cgroup: str | None, mode: Mode) -> None:
    assert resolve_mode(JobRequest("j", pid=pid, cgroup=cgroup)) is mode


@pytest.mark.parametrize(("mode", "pid", "cgroup", "message"), [
    (Mode.SIGNAL, None, None, "A job in signal mode needs a pid or a cgroup."),
    (Mode.CGROUP, None, None, "A job in cgroup mode needs a pid or a cgroup."),
    (Mode.COOPERATIVE, None, "/sys/fs/cgroup/x",
     "A cooperative job is named by a pid or nothing, not a cgroup."),
    (Mode.COOPERATIVE, 42, "/sys/fs/cgroup/x",
     "A cooperative job is named by a pid or nothing, not a cgroup."),
])
def test_a_mode_refuses_what_it_cannot_hold(mode: Mode, pid: int | None, cgroup: str | None,
                                            message: str) -> None:
    with pytest.raises(RegistrationError) as refused:
        resolve_mode(JobRequest("j", pid=pid, cgroup=cgroup, mode=mode))
    assert (type(refused.value), refused.value.message) == (Unacceptable, message)
    assert status_of(refused.value) == 422
