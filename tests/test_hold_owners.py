"""Who may lift a hold: a user of the unix socket may undo only the operator holds they put
in place. `nobody` pauses and resumes their own job; once a token holder has paused it,
their resume and their unregistration (which would resume it first) are refused, and a
restart keeps who put the hold there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, wait_for
from tests.support.scenario import config, stopped
from tests.support.unix_http import NOBODY, open_to_others, unix_request

StartDaemon = Callable[..., DaemonProcess]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")


def test_a_users_resume_lifts_only_a_hold_of_their_own(
        daemon: StartDaemon, sys_tree: Path, proc_tree: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    base = Path(tempfile.mkdtemp(prefix="governor-sock-"))  # pytest's tmp is root's alone
    base.chmod(0o755)
    sock = base / "run" / "governor.sock"
    settings = config(sys_tree, proc_tree, api={"socket": str(sock)})
    d = daemon(settings)
    d.cleanups.append(lambda: shutil.rmtree(base, ignore_errors=True))
    open_to_others(sock)
    theirs = subprocess.Popen(["sleep", "600"], user=NOBODY)
    children.append(theirs)

    def as_nobody(method: str, target: str, body: str = "") -> tuple[int, str]:
        return unix_request(sock, method, target, body, as_uid=NOBODY)

    status, body = as_nobody("POST", "/v1/jobs", json.dumps({"name": "mine",
                                                             "pid": theirs.pid}))
    assert status == 201, body
    job_id = json.loads(body)["id"]
    assert as_nobody("POST", f"/v1/jobs/{job_id}/pause")[0] == 200
    assert as_nobody("POST", f"/v1/jobs/{job_id}/resume")[0] == 200, "their own hold"

    assert d.call("POST", f"/v1/jobs/{job_id}/pause").status_code == 200
    wait_for(stopped(theirs.pid), 5.0, "the operator's pause", d)
    refusal = (403, f"Job {job_id} was paused by token; only they, root or a token holder "
                    "may lift that hold.")
    assert as_nobody("POST", f"/v1/jobs/{job_id}/resume") == refusal
    assert as_nobody("DELETE", f"/v1/jobs/{job_id}") == refusal

    d.stop()  # which runs its cleanups: the restarted one gets its own
    d.start()
    d.cleanups.append(lambda: shutil.rmtree(base, ignore_errors=True))
    open_to_others(sock)
    assert d.job(job_id)["held_by_operator"]
    assert as_nobody("POST", f"/v1/jobs/{job_id}/resume") == refusal, "kept across a restart"
    assert d.call("POST", f"/v1/jobs/{job_id}/resume").status_code == 200
