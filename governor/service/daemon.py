"""The daemon: config -> samplers -> sampling loop -> controller -> API, wired in one place.

`governor run` builds a `Daemon` and calls `serve()`. The listening sockets are bound
before anything else starts, so a taken port is one clear error and not a half-started
daemon. On SIGTERM or SIGINT every job is released before the daemon exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from governor import __version__
from governor.actuators.base import Actuator, ActuatorError
from governor.actuators.cgroup import CgroupActuator
from governor.actuators.gpu_power import PowerCapper
from governor.actuators.modes import MODES, ModeContext
from governor.api.app import create_app
from governor.api.auth import Authenticator, ensure_token
from governor.api.connections import ConnectionLimits, GuardedProtocol, Listener
from governor.api.errors import status_of
from governor.api.hosts import default_allowed_hosts
from governor.config import ApiConfig, Config, ConfigError, is_loopback, load_config
from governor.control.controller import Controller
from governor.control.sources import SourceSync
from governor.jobs.exits import raise_fd_limit
from governor.jobs.model import Job, Mode
from governor.jobs.sources import build_sources
from governor.safety.guardian import Guardian
from governor.safety.journal import Journal
from governor.safety.release import release_holds
from governor.safety.state_lock import LockHeld, StateLock
from governor.sampling.registry import build_samplers
from governor.sampling.runner import SamplerRunner
from governor.service.audit import FILENAME as AUDIT_FILENAME
from governor.service.audit import AuditLog
from governor.service.loop import SamplingLoop
from governor.service.metrics import DaemonMetrics
from governor.service.sd_notify import Notifier, summary
from governor.snapshot import Snapshot, SnapshotStore

if TYPE_CHECKING:
    from governor.sampling.simulated import SimulatedSampler

log = logging.getLogger(__name__)

#: how long a starting daemon waits for the state lock (a dead daemon's guardian may be
#: releasing its holds)
LOCK_WAIT = 3.0


class StartupError(Exception):
    """The daemon cannot start; the message is the one line the operator sees."""


def bind(host: str, port: int) -> socket.socket:
    """The API's TCP socket. Named IPPROTO_TCP, with TCP_NODELAY (inherited by accepted
    connections): asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    without it a response written in two parts (headers, body) waits for the client's
    delayed ACK, 40 ms per request on a keep-alive connection such as Prometheus's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def bind_unix(path: str) -> socket.socket:
    """A unix socket in a directory of mode 0750, so only root and the directory's group
    can reach it, whatever mode the socket itself gets. A directory that already exists
    is the operator's to set up (systemd's RuntimeDirectory=): its mode is left alone."""
    target = Path(path)
    try:
        if not target.parent.exists():
            target.parent.mkdir(parents=True, mode=0o750)
            os.chmod(target.parent, 0o750)  # whatever the umask took away
        elif target.parent.stat().st_mode & 0o007:
            log.warning("the unix socket's directory %s is open to every user (mode %o); "
                        "callers are still told apart by uid", target.parent,
                        target.parent.stat().st_mode & 0o7777)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(target))
        os.chmod(target, 0o660)
    except OSError as exc:
        raise StartupError(f"cannot listen on the unix socket {path}: {exc.strerror}") from None
    return sock


def check_exposure(api: ApiConfig) -> None:
    """Refuse a listener the network can reach when nothing guards changes; warn when the
    token would cross the network in clear text."""
    if is_loopback(api.host):
        return
    if not api.token_file:
        raise StartupError(
            f"api.listen = {api.listen!r} is reachable from the network, but "
            'api.token_file = "": set a token file, or listen on 127.0.0.1')
    if not api.tls:
        log.warning("api.listen = %r is reachable from the network without TLS: the token "
                    "and every answer cross it in clear text (set api.tls_cert and "
                    "api.tls_key)", api.listen)


def check_tls(api: ApiConfig) -> None:
    """Load the certificate and key once, so a bad pair is one clear line at start and not
    a traceback from inside uvicorn."""
    if not api.tls:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(api.tls_cert, api.tls_key)
    except ssl.SSLError as exc:
        raise StartupError(f"api.tls_cert / api.tls_key: cannot load {api.tls_cert} with "
                           f"{api.tls_key}: {exc.reason or exc}") from None
    except OSError as exc:
        raise StartupError(f"api.tls_cert / api.tls_key: {exc.strerror}: "
                           f"{exc.filename or api.tls_cert}") from None


class ApiServer(uvicorn.Server):
    """uvicorn, minus its signal handling, and with TLS on TCP only.

    uvicorn re-raises a captured SIGTERM once serving stops, which kills the process
    before the daemon has released what it holds. Here SIGTERM and SIGINT only ask the
    server to stop, and SIGHUP reloads the config; the daemon cleans up and exits 0.
    """

    #: how often the idle server looks up: the Date header's resolution
    TICK = 1.0

    def __init__(self, config: uvicorn.Config, daemon: Daemon,
                 limits: ConnectionLimits | None = None):
        super().__init__(config)
        self._daemon = daemon
        self.limits = limits if limits is not None else ConnectionLimits()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    async def main_loop(self) -> None:
        """uvicorn's own loop wakes every 0.1 s to see whether it should stop: ten
        wake-ups a second, a third of an idle daemon's CPU at the default interval. This
        one ticks once a second, uvicorn's `on_tick` counting as if ten had passed (the
        Date header is still renewed every second), and a stop wakes it at once."""
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.TICK)

    def _wake(self) -> None:
        """Ends the main loop's wait (from a signal handler, or any thread)."""
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(self._stopping.set)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self._listen(sockets)
        if self.started:
            self._daemon.listening()

    async def _listen(self, sockets: list[socket.socket] | None) -> None:
        """One server per socket, each with its own count of connections (a flood of the
        TCP port leaves the unix socket's room alone), and TLS on TCP only: the unix
        socket stays plain HTTP, the kernel vouches for its peers, and the CLI reaches it
        without certificates. A TLS handshake gets the header timeout too."""
        await self.lifespan.startup()  # lifespan is off; kept for uvicorn's state
        config, limits = self.config, self.limits
        loop = asyncio.get_running_loop()
        self.servers = []
        for sock in sockets or []:
            listener: Listener = "unix" if sock.family == socket.AF_UNIX else "tcp"

            def protocol(listener: Listener = listener) -> asyncio.Protocol:
                return GuardedProtocol(config=config, server_state=self.server_state,
                                       app_state=self.lifespan.state, limits=limits,
                                       listener=listener)

            tls = config.ssl if listener == "tcp" else None
            self.servers.append(await loop.create_server(
                protocol, sock=sock, backlog=config.backlog, ssl=tls,
                ssl_handshake_timeout=limits.header_timeout if tls is not None else None))
        self.started = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        def stop(signum: int, _: FrameType | None) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            if self.should_exit and signum == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            self._wake()

        def hangup(_signum: int, _frame: FrameType | None) -> None:
            threading.Thread(target=self._daemon.reload_quietly, name="reload").start()

        handlers = {signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: hangup}
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class Daemon:
    """Started in this order so that nothing is ever held without a way back: the
    samplers (which may refuse: nvml = "required"), the state lock (one daemon per
    journal), the holds a crashed run left (undone), the guardian (before any new hold),
    the jobs the journal lists (adopted), then sampling."""

    def __init__(self, config: Config, config_path: Path | None = None):
        # first, so that NOTIFY_SOCKET leaves the environment before any child is started
        self.notifier = Notifier()
        #: said in systemd's STATUS until a reload succeeds
        self._reload_failure: str | None = None
        self._ready = False
        self.config = config
        self.config_path = config_path
        raise_fd_limit()  # a pidfd per job
        samplers = build_samplers(config.sources, jobs=self._job_processes)
        #: the simulated GPUs (sources.simulate), whose power limits power_cap rules set
        self._simulated: SimulatedSampler | None = None
        if config.sources.simulate:  # their module is imported only then
            from governor.sampling.simulated import SimulatedSampler

            self._simulated = next(
                (s for s in samplers if isinstance(s, SimulatedSampler)), None)
        state_dir = Path(config.daemon.state_dir)
        self.lock = StateLock(state_dir)
        try:
            self.lock.acquire(timeout=LOCK_WAIT)
        except (LockHeld, OSError) as exc:
            raise StartupError(f"daemon.state_dir: {exc}") from None
        self.store = SnapshotStore()
        self.metrics = DaemonMetrics(self.store)
        self.metrics.expect_actions(config.rules)
        self.audit = AuditLog(state_dir / AUDIT_FILENAME,
                              config.audit.max_bytes, config.audit.keep,
                              on_error=self.metrics.audit_errors.inc)
        self.journal = Journal(state_dir)
        for problem in self.journal.load():
            log.error("journal: %s", problem)
        if self.journal.holds():
            log.warning("the last run left %d hold(s) in %s; releasing them",
                        len(self.journal.holds()), self.journal.path)
            release_holds(self.journal)
        self.guardian = Guardian(state_dir)
        self.runner = SamplerRunner(samplers, config.daemon.effective_sampler_timeout,
                                    interval=config.daemon.interval)
        self.loop = SamplingLoop(self.runner, self.store, self.metrics, config.daemon.interval)
        self.controller = self._build_controller(config)
        self._protect_guardian()
        self.metrics.watch(self.controller)
        self.controller.adopt(self.journal.jobs())
        cgroups = self.controller.actuator(Mode.CGROUP)
        if isinstance(cgroups, CgroupActuator):
            cgroups.sweep(job.id for job in self.controller.view.jobs)
        self.sources = SourceSync(self.controller, build_sources(config))
        self.loop.add_hook(self._keep_guardian)
        self.loop.add_hook(self.sources.on_round)
        self.loop.add_hook(self.controller.on_snapshot)
        self.loop.add_hook(self._tell_systemd)
        self._reload_lock = threading.Lock()
        self._serving = False

    def _job_processes(self) -> list[tuple[int, list[str]]]:
        """For the simulated GPUs: each live job's process and the devices it is bound to,
        from the controller's published view (nothing before the controller exists)."""
        controller: Controller | None = getattr(self, "controller", None)
        if controller is None:
            return []
        return [(job.pid, list(job.devices)) for job in controller.view.jobs
                if job.pid is not None and job.state != "gone"]

    def _protect_guardian(self) -> None:
        if self.guardian.pid is not None:
            self.controller.registry.protected.add(self.guardian.pid)

    def _keep_guardian(self, _: Snapshot) -> None:
        if self.guardian.ensure():
            self._protect_guardian()

    def _guardian_pids(self) -> tuple[int, ...]:
        return (self.guardian.pid,) if self.guardian.pid is not None else ()

    def _build_controller(self, config: Config) -> Controller:
        context = ModeContext(self.journal, config, self._guardian_pids,
                              report=self._report_outside)
        actuators: dict[Mode, Actuator] = {}
        unavailable: dict[Mode, str] = {}
        for mode, spec in MODES.items():
            try:
                actuators[mode] = spec.actuator(context)
            except ActuatorError as exc:
                unavailable[mode] = str(exc)
                log.info("%s mode is not available: %s", mode.value, exc)
        power = None
        power_unavailable = None
        if self._simulated is not None:
            power = PowerCapper(self.journal, nvml=self._simulated.nvml, is_root=lambda: True)
        elif config.sources.nvml == "off":
            power_unavailable = 'NVML is off (sources.nvml = "off")'
        else:
            power = PowerCapper(self.journal)
        return Controller(
            config, self.journal, actuators, power, unavailable_modes=unavailable,
            power_unavailable=power_unavailable, on_action=self.metrics.count_action,
            audit=self._audit_control,
        )

    def _report_outside(self, job: Job, what: str) -> None:
        """An actuator saw a job it held let go by someone else: audited, and counted
        when it was a resume (a continue governor undid is no resume: only audited)."""
        if what == "outside-resume":
            self.metrics.outside_resumes.labels(job.source).inc()
        self.controller.note_outside(job, what)

    def _audit_control(self, event: dict[str, Any]) -> None:
        """The controller's audit sink: a refused request's kind of refusal is written as
        the HTTP status the API answered it with, in the same place."""
        if "refusal" in event:
            event = dict(("status", status_of(value)) if key == "refusal" else (key, value)
                         for key, value in event.items())
        self.audit.append(event)

    # --- what the API reads (DaemonView) ---

    def health(self) -> tuple[bool, str]:
        return self.loop.health()

    def latest(self) -> Snapshot | None:
        return self.store.latest

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def cached_metrics(self) -> bytes | None:
        return self.metrics.cached()

    def reload(self, who: str = "operator (SIGHUP)") -> list[dict[str, Any]]:
        """Reload the config file, telling systemd (RELOADING=1, then READY=1). A bad
        file raises ConfigError, changes nothing, and stays in systemd's STATUS line
        until a reload succeeds."""
        self.notifier.reloading()
        try:
            rules = self._reload(who)
        except ConfigError as exc:
            self._reload_failure = exc.lines()[0]
            raise
        else:
            self._reload_failure = None
            return rules
        finally:
            self.notifier.ready(self.status_line())

    def _reload(self, who: str) -> list[dict[str, Any]]:
        """Reload the config file. A bad file raises ConfigError and changes nothing.
        `who` asked, for the audit log."""
        with self._reload_lock:
            source = str(self.config_path or "defaults")
            try:
                config = load_config(self.config_path)
            except ConfigError as exc:
                self._note("reload-refused", who, exc.lines())
                raise
            for section in ("api", "sources"):
                if getattr(config, section) != getattr(self.config, section):
                    log.warning("reload: [%s] changed; restart the daemon to apply it", section)
            if config.daemon.state_dir != self.config.daemon.state_dir:
                log.warning("reload: daemon.state_dir changed; restart the daemon to apply it")
            for key in ("cgroup_version", "slow_period", "protected_executables",
                        "protected_units"):
                if getattr(config.jobs, key) != getattr(self.config.jobs, key):
                    log.warning("reload: jobs.%s changed; restart the daemon to apply it", key)
            rules = self.controller.reload(config)
            self.metrics.expect_actions(config.rules)
            self.loop.interval = config.daemon.interval
            self.runner.timeout = config.daemon.effective_sampler_timeout
            self.audit.configure(config.audit.max_bytes, config.audit.keep)
            self.runner.interval = config.daemon.interval
            self.config = config
            self._note("reload", who, [f"{source}: {len(config.rules)} rule(s)"],
                       rules=[rule.name for rule in config.rules])
            log.info("reloaded %s: %d rule(s)", self.config_path or "defaults", len(config.rules))
            return rules

    def _note(self, what: str, who: str, reasons: list[str], **more: Any) -> None:
        """An audit event about the daemon itself: a reload, a start, a stop."""
        self.audit.append({"who": who, "what": what, "job": None,
                           "why": {"reasons": reasons, "readings": []}, "round": None, **more})

    def reload_quietly(self) -> None:
        """SIGHUP: reload, and on a bad file keep the running config and say why."""
        try:
            self.reload()
        except ConfigError as exc:
            for line in exc.lines():
                log.error("reload refused, keeping the running config: %s", line)

    # --- systemd ---

    def status_line(self) -> str:
        snapshot = self.store.latest
        gpus = 0 if snapshot is None else sum(1 for _ in snapshot.of("gpu_info"))
        view = self.controller.view
        line = summary(gpus, [job.state for job in view.jobs], list(view.rules))
        if self._reload_failure is not None:
            line += f"; reload failed, running the previous config: {self._reload_failure}"
        return line

    def listening(self) -> None:
        """The API listens and the first round is done: systemd may call us started."""
        self.notifier.ready(self.status_line())
        self._ready = True

    def _tell_systemd(self, _: Snapshot) -> None:
        """After each round, on the loop's own thread: a watchdog ping (so a hung loop is
        noticed) and the summary line; nothing before READY=1."""
        if not self._ready or not self.notifier.enabled:
            return
        self.notifier.ping()
        self.notifier.status(self.status_line())

    # --- life cycle ---

    def serve(self) -> None:
        api = self.config.api
        check_exposure(api)
        check_tls(api)
        try:
            token = ensure_token(api.token_file)
        except (OSError, ValueError) as exc:
            raise StartupError(f"api.token_file: {exc}") from None
        sockets = [bind(api.host, api.port)]
        if api.socket:
            sockets.append(bind_unix(api.socket))
        log.info(
            "governor %s: config %s; sampling every %g s",
            __version__, self.config_path or "(built-in defaults)", self.config.daemon.interval,
        )
        self._serving = True
        self._note("start", "governor", [f"governor {__version__} started with "
                                         f"{self.config_path or 'built-in defaults'}"])
        self.loop.start()
        self.loop.wait_first_round(timeout=max(5.0, 2 * self.config.daemon.interval))
        app = create_app(self, Authenticator(token, api.allow_unauthenticated),
                         allowed_hosts=api.allowed_hosts or default_allowed_hosts(api.host),
                         max_body_bytes=api.max_body_bytes)
        # What exists now lives as long as the daemon. Out of the collector's sight, a
        # full collection under API load scans only what came later: tens of ms held
        # under the GIL on a busy box, which the sampling loop would wait for.
        gc.freeze()
        server = ApiServer(
            uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                lifespan="off",
                http=GuardedProtocol,
                # who the client is comes from the socket, never from a header
                proxy_headers=False,
                forwarded_allow_ips="",
                timeout_graceful_shutdown=3,
                # between requests; a request's own headers get api.header_timeout
                timeout_keep_alive=5,
                ssl_certfile=api.tls_cert or None,
                ssl_keyfile=api.tls_key or None,
            ),
            self,
            ConnectionLimits(api.max_connections, api.header_timeout,
                             api.max_connections_per_user),
        )
        log.info("serving /metrics, /healthz and /v1 on %s://%s%s",
                 "https" if api.tls else "http", api.listen,
                 f" and {api.socket}" if api.socket else "")
        try:
            asyncio.run(server.serve(sockets=sockets))
        finally:
            self.close()

    def close(self) -> None:
        """Release every job and power limit, then let the guardian go and the lock."""
        self.notifier.stopping()
        self.loop.stop()
        self.sources.close()
        self.controller.shutdown()
        self.runner.close()
        if self._serving:
            self._note("stop", "governor", ["stopped; every job was released and every power "
                                            "limit restored"])
        self.audit.close()
        self.journal.close()
        # the lock first: the guardian takes it to check (and retry) what is left held
        self.lock.release()
        self.guardian.stop()
        self.notifier.close()
        log.info("governor stopped")
