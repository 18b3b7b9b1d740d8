"""The kinds of refusal carry no HTTP status; api/errors.py alone gives each one."""

from __future__ import annotations

from governor.api.errors import status_of
from governor.jobs.errors import (
    Conflict,
    NoSuchJob,
    NotPermitted,
    NotRecorded,
    OverQuota,
    RegistrationError,
    Unacceptable,
)


def test_each_kind_of_refusal_has_its_documented_status() -> None:
    assert {kind: status_of(kind) for kind in (NoSuchJob, NotPermitted, Conflict,
                                               Unacceptable, OverQuota, NotRecorded)} == {
        NoSuchJob: 404, NotPermitted: 403, Conflict: 409, Unacceptable: 422, OverQuota: 429,
        NotRecorded: 507}
    assert status_of(NoSuchJob("There is no job 'x'.")) == 404


def test_a_kind_not_in_the_table_takes_its_base_s_status() -> None:
    class Gone(Conflict):
        pass

    assert status_of(Gone("exited")) == 409
    assert status_of(RegistrationError("refused")) == 422
    assert not hasattr(NotPermitted("no"), "status")
