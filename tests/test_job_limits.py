"""What one user may cost the daemon: how many jobs (jobs.max_per_user), and how long a
cooperative job with no process stays registered once it stops polling
(jobs.cooperative_expire_after). A real daemon; the user is `nobody` on the unix socket.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.daemon import DaemonProcess
from tests.support.processes import eventually
from tests.support.scenario import ROOT, config
from tests.support.unix_http import NOBODY, open_to_others, socket_dir, unix_request

StartDaemon = Callable[..., DaemonProcess]


@pytest.mark.skipif(not ROOT, reason="acting as another user needs root")
def test_a_user_over_the_quota_gets_429_and_root_does_not(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path) -> None:
    """`nobody` registered 4,000 jobs, each costing the daemon memory, a journal write and
    work every round: 64 (the default) is the most one user may have at once."""
    base = socket_dir()
    sock = base / "run" / "governor.sock"
    d = daemon(config(sys_tree, proc_tree, api={"socket": str(sock)}))
    d.cleanups.append(lambda: shutil.rmtree(base, ignore_errors=True))
    open_to_others(sock)

    def register(name: str, as_uid: int | None = NOBODY) -> tuple[int, str]:
        return unix_request(sock, "POST", "/v1/jobs",
                            json.dumps({"name": name, "mode": "cooperative"}), as_uid=as_uid)

    ids = []
    for n in range(64):
        status, body = register(f"mine-{n}")
        assert status == 201, body
        ids.append(json.loads(body)["id"])
    assert register("one-too-many") == (429, (
        f"Uid {NOBODY} already has 64 jobs registered, the most one user may have "
        "(jobs.max_per_user = 64)."))
    status, _ = register("roots", as_uid=None)
    assert status == 201, "root is not limited"
    assert unix_request(sock, "DELETE", f"/v1/jobs/{ids[0]}", as_uid=NOBODY)[0] == 204
    assert register("after-one-left")[0] == 201


def test_a_cooperative_job_that_stops_polling_is_unregistered(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path) -> None:
    """A cooperative job with no process is alive only as long as it polls: one whose
    process died would otherwise stay registered forever. A poll waiting longer than the
    expiry keeps its job while it waits."""
    d = daemon(config(sys_tree, proc_tree, jobs={"cooperative_expire_after": "2s"}))
    silent = d.register(name="silent", mode="cooperative")
    waiting = d.register(name="waiting", mode="cooperative")
    answered: list[httpx.Response] = []
    long_poll = threading.Thread(target=lambda: answered.append(
        d.call("GET", f"/v1/jobs/{waiting['id']}/directive", params={"wait": 5})))
    long_poll.start()
    # anyone may read its directive, but only the job's own polls keep it alive
    stranger = threading.Thread(target=lambda: d.get(
        f"/v1/jobs/{silent['id']}/directive", params={"wait": 10}))
    stranger.start()
    try:
        eventually(lambda: d.get(f"/v1/jobs/{silent['id']}").status_code == 404,
                   timeout=15, what="the silent job is unregistered")
    finally:
        long_poll.join(30)
        stranger.join(30)
    (reply,) = answered
    assert reply.status_code == 200, "the job waiting on its poll is still there"
    assert [job["id"] for job in d.get("/v1/jobs").json()] == [waiting["id"]]

    def unregistered() -> list[dict[str, Any]]:
        return [e for e in d.get("/v1/events").json()["events"]
                if e["what"] == "unregister"]

    (event,) = unregistered()
    assert (event["who"], event["job"]["id"]) == ("governor", silent["id"])
    assert event["why"]["reasons"] == [
        "no directive poll for 2s (jobs.cooperative_expire_after)"]
    eventually(lambda: d.get(f"/v1/jobs/{waiting['id']}").status_code == 404, timeout=15,
               what="once it stops polling, the other one goes too")


def test_the_limits_are_checked_keys() -> None:
    from governor.config import ConfigError, parse_config

    jobs = parse_config({}).jobs
    assert (jobs.max_per_user, jobs.cooperative_expire_after) == (64, 600.0)
    never = parse_config({"jobs": {"cooperative_expire_after": 0}}).jobs
    assert never.cooperative_expire_after == 0
    with pytest.raises(ConfigError) as caught:
        parse_config({"jobs": {"max_per_user": 0, "cooperative_expire_after": "soon"}})
    assert sorted(p.key for p in caught.value.problems) == [
        "jobs.cooperative_expire_after", "jobs.max_per_user"]
