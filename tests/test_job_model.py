"""A job's journal record (what `Job.to_record` writes, `Job.from_record` reads back), and
the controller's published view of it."""

from __future__ import annotations

import json

from governor.client.progress import Progress
from governor.control.view import DirectiveView, JobView
from governor.jobs.model import Job, Mode, pause, slow


def a_job() -> Job:
    return Job(id="ab12cd34", name="trainer", mode=Mode.CGROUP, pid=4242,
               pid_started_at=1712.5, cgroup="/sys/fs/cgroup/governor/ab12cd34",
               devices=("gpu1", "gpu0"), priority=3, registered_at=1700000000.25,
               owner_uid=1000, restricted_uid=1000, held_by_operator=True,
               held_by="uid 1000 (unix socket)", hold_uid=1000,
               saved={"original_cgroup": "/sys/fs/cgroup/user.slice"})


def test_a_record_is_the_jobs_json_with_what_a_restart_needs() -> None:
    job = a_job()
    job.auto_devices = frozenset({"gpu3"})
    job.directive = pause("operator pause", rules=("operator",))
    assert job.to_record() == {
        "id": "ab12cd34", "name": "trainer", "pid": 4242, "pid_started_at": 1712.5,
        "cgroup": "/sys/fs/cgroup/governor/ab12cd34", "mode": "cgroup",
        "devices": ["gpu1", "gpu0"], "devices_from": "registration", "priority": 3,
        "state": "paused", "speed": 0.0, "reasons": ["operator pause"],
        "held_by_operator": True, "registered_at": 1700000000.25, "owner_uid": 1000,
        "gone_at": None, "source": "api", "scheduler_id": None, "user": None,
        "restricted_uid": 1000, "saved": {"original_cgroup": "/sys/fs/cgroup/user.slice"},
        "held_by": "uid 1000 (unix socket)", "hold_uid": 1000, "discovered": False,
    }
    assert list(job.to_record()) == [*job.as_dict(), "restricted_uid", "saved", "held_by",
                                     "hold_uid", "discovered"], \
        "the journal's key order"


def test_a_job_comes_back_from_its_record() -> None:
    job = a_job()
    record = json.loads(json.dumps(job.to_record()))  # as the journal stores it
    back = Job.from_record(job.id, record)
    assert back == job
    assert back.to_record() == job.to_record()


def test_a_record_from_an_older_run_fills_in_the_defaults() -> None:
    back = Job.from_record("ff", {"name": "n", "mode": "signal", "pid": "12",
                                  "pid_started_at": 3, "registered_at": "5"})
    assert back == Job(id="ff", name="n", mode=Mode.SIGNAL, pid=12, pid_started_at=3.0,
                       cgroup=None, devices=(), priority=0, registered_at=5.0)


def test_the_published_view_of_a_job_is_its_json_with_its_error_and_progress() -> None:
    job = a_job()
    assert JobView.of(job).as_json() == job.as_dict()
    assert list(JobView.of(job).as_json()) == list(job.as_dict())
    job.devices, job.auto_devices = (), frozenset({"gpu2", "gpu1"})
    job.directive = slow(0.5, "cpu-hot: 93 > 90", rules=("cpu-hot",))
    job.gone_at = 1700000100.0
    job.extra["error"] = "process 4242 has exited"
    job.progress = Progress(steps=7, step_seconds=1.5, step_buckets=(1, 2, 3, 4, 5, 6, 7, 7),
                            deferrals=2, reported_at=1700000050.0)
    view = JobView.of(job)
    assert view.as_json() == {**job.as_dict(), "error": "process 4242 has exited",
                              "progress": job.progress.as_dict()}
    assert list(view.as_json())[-2:] == ["error", "progress"]
    assert (view.devices, view.devices_from, view.state) == (("gpu1", "gpu2"), "nvml", "gone")
    directive = DirectiveView(job.directive, 3)
    assert directive.as_json() == {"state": "slow", "speed": 0.5,
                                   "reasons": ["cpu-hot: 93 > 90"], "defer": True}


def test_a_job_resumed_outside_governor_shows_it_runs_while_its_directive_stays_paused(
        ) -> None:
    """An administrator's `scontrol resume` during governor's pause: the job's state and
    speed say what it does, its reasons why governor would hold it, and the journal's
    record keeps none of it (a restarted daemon holds the job anew)."""
    job = a_job()
    job.directive = pause("gpu-hot: 95 > 85", rules=("gpu-hot",))
    job.outside = "resumed"
    shown = job.as_dict()
    assert (shown["state"], shown["speed"], shown["outside"], shown["reasons"]) == (
        "running", 1.0, "resumed", ["gpu-hot: 95 > 85"])
    assert JobView.of(job).as_json() == shown
    assert job.directive.as_dict()["state"] == "pause", "cooperative clients still read it"
    assert "outside" not in job.to_record() and job.to_record()["state"] == "running"
    job.outside = None
    assert "outside" not in job.as_dict() and job.as_dict()["state"] == "paused"
