"""The polled job sources, joined to the controller: once a round, before the round is
evaluated, what each source found started is registered and what ended is unregistered,
so a job found this round is governed by this round's rules.

A registration the controller refuses (a job it may not hold that way) is logged once,
and the job is left alone while it runs, as is a job unregistered by hand. Discovery
wins over any other registration of the same job (a prolog's, an operator's, a decoy
registered before the job started): it is replaced by the job as the source found it,
so that no registration can hide a job from discovery. A source that
fails is reported, never fatal: its jobs stay as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from governor.control.controller import Controller
from governor.jobs.errors import NoSuchJob, RegistrationError
from governor.jobs.registry import Caller
from governor.jobs.sources.base import JobSource
from governor.snapshot import Snapshot

log = logging.getLogger(__name__)


class SourceSync:
    def __init__(self, controller: Controller, sources: Sequence[JobSource]):
        self.controller = controller
        self.sources = list(sources)
        #: (source, scheduler id) -> the last complaint logged, so each is logged once
        self._complaints: dict[tuple[str, str], str] = {}
        self._problems: dict[str, tuple[str, ...]] = {}

    def on_round(self, _snapshot: Snapshot | None = None) -> None:
        for source in self.sources:
            try:
                changes = source.poll()
            except Exception:
                log.exception("job source %s failed; its jobs are kept as they are",
                              source.name)
                continue
            caller = Caller(None, source.name)
            for scheduler_id in changes.ended:
                self._complaints.pop((source.name, scheduler_id), None)
                for job_id in self.controller.scheduled(source.name, scheduler_id):
                    try:
                        self.controller.unregister(job_id, caller)
                    except RegistrationError as exc:
                        log.info("%s job %s: %s", source.name, scheduler_id, exc)
            for request in changes.started:
                scheduler_id = str(request.scheduler_id)
                others = self.controller.scheduled(source.name, scheduler_id)
                if self._discovered(others):
                    continue  # found by a daemon before this one, and taken back
                try:
                    if others:  # a prolog's or anyone's: discovery's registration wins
                        self.controller.supersede(others, request, caller)
                    else:
                        self.controller.register(request, caller, discovered=True)
                except RegistrationError as exc:
                    key = (source.name, scheduler_id)
                    if self._complaints.get(key) != str(exc):
                        log.warning("%s job %s (%s) cannot be governed: %s", source.name,
                                    scheduler_id, request.name, exc)
                        self._complaints[key] = str(exc)
            if changes.problems != self._problems.get(source.name, ()):
                for problem in changes.problems:
                    log.warning("job source %s: %s", source.name, problem)
                self._problems[source.name] = changes.problems

    def _discovered(self, job_ids: list[str]) -> bool:
        for job_id in job_ids:
            try:
                if self.controller.registry.get(job_id).discovered:
                    return True
            except NoSuchJob:
                continue
        return False

    def close(self) -> None:
        for source in self.sources:
            try:
                source.close()
            except Exception:
                log.exception("job source %s failed to close", source.name)
