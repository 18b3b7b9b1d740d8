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
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from governor import __version__
from governor.actuators.base import Actuator, ActuatorError
from governor.actuators.cgroup import CgroupActuator
from governor.actuators.cooperative import CooperativeActuator
from governor.actuators.gpu_power import PowerCapper
from governor.actuators.signal import SignalActuator
from governor.api.app import create_app
from governor.api.auth import Authenticator, PeerCredProtocol, ensure_token
from governor.config import Config, load_config
from governor.control import Controller
from governor.jobs.model import Mode
from governor.journal import Journal
from governor.loop import SamplingLoop
from governor.metrics import DaemonMetrics
from governor.release import release_holds
from governor.sampling.registry import build_samplers
from governor.sampling.runner import SamplerRunner
from governor.snapshot import Snapshot, SnapshotStore

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The daemon cannot start; the message is the one line the operator sees."""


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def bind_unix(path: str) -> socket.socket:
    """A unix socket in a directory of mode 0750: only root and the directory's group can
    reach it, whatever mode the socket itself gets."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(target.parent, 0o750)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(target))
        os.chmod(target, 0o660)
    except OSError as exc:
        raise StartupError(f"cannot listen on the unix socket {path}: {exc.strerror}") from None
    return sock


class ApiServer(uvicorn.Server):
    """uvicorn, minus its signal handling.

    uvicorn re-raises a captured SIGTERM once serving stops, which kills the process
    before the daemon has released what it holds. Here SIGTERM and SIGINT only ask the
    server to stop, and SIGHUP reloads the config; the daemon cleans up and exits 0.
    """

    def __init__(self, config: uvicorn.Config, daemon: Daemon):
        super().__init__(config)
        self._daemon = daemon

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        def stop(signum: int, _: FrameType | None) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            if self.should_exit and signum == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

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
    def __init__(self, config: Config, config_path: Path | None = None):
        self.config = config
        self.config_path = config_path
        self.store = SnapshotStore()
        self.metrics = DaemonMetrics(self.store)
        self.journal = Journal(config.daemon.state_dir)
        for problem in self.journal.load():
            log.error("journal: %s", problem)
        # A run that died while holding jobs left its holds here: undo them first.
        if self.journal.holds():
            log.warning("the last run left %d hold(s) in %s; releasing them",
                        len(self.journal.holds()), self.journal.path)
            release_holds(self.journal)
        self.runner = SamplerRunner(
            build_samplers(config.sources), config.daemon.effective_sampler_timeout,
            interval=config.daemon.interval,
        )
        self.loop = SamplingLoop(self.runner, self.store, self.metrics, config.daemon.interval)
        self.controller = self._build_controller(config)
        self.metrics.watch(self.controller)
        self.loop.add_hook(self.controller.on_snapshot)
        self._reload_lock = threading.Lock()

    def _build_controller(self, config: Config) -> Controller:
        actuators: dict[Mode, Actuator] = {
            Mode.SIGNAL: SignalActuator(self.journal, period=config.jobs.slow_period),
            Mode.COOPERATIVE: CooperativeActuator(),
        }
        unavailable: dict[Mode, str] = {}
        try:
            actuators[Mode.CGROUP] = CgroupActuator(self.journal,
                                                    version=config.jobs.cgroup_version)
        except ActuatorError as exc:
            unavailable[Mode.CGROUP] = str(exc)
            log.info("cgroup mode is not available: %s", exc)
        power = None
        power_unavailable = None
        if config.sources.nvml == "off":
            power_unavailable = 'NVML is off (sources.nvml = "off")'
        else:
            power = PowerCapper(self.journal)
        return Controller(
            config, self.journal, actuators, power, unavailable_modes=unavailable,
            power_unavailable=power_unavailable, on_action=self.metrics.count_action,
        )

    # --- what the API reads (DaemonView) ---

    def health(self) -> tuple[bool, str]:
        return self.loop.health()

    def latest(self) -> Snapshot | None:
        return self.store.latest

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def reload(self) -> list[dict[str, Any]]:
        """Reload the config file. A bad file raises ConfigError and changes nothing."""
        with self._reload_lock:
            config = load_config(self.config_path)
            for section in ("api", "sources"):
                if getattr(config, section) != getattr(self.config, section):
                    log.warning("reload: [%s] changed; restart the daemon to apply it", section)
            if config.daemon.state_dir != self.config.daemon.state_dir:
                log.warning("reload: daemon.state_dir changed; restart the daemon to apply it")
            rules = self.controller.reload(config)
            self.loop.interval = config.daemon.interval
            self.runner.timeout = config.daemon.effective_sampler_timeout
            self.runner.interval = config.daemon.interval
            self.config = config
            log.info("reloaded %s: %d rule(s)", self.config_path or "defaults", len(config.rules))
            return rules

    def reload_quietly(self) -> None:
        """SIGHUP: reload, and on a bad file keep the running config and say why."""
        from governor.config import ConfigError

        try:
            self.reload()
        except ConfigError as exc:
            for line in exc.lines():
                log.error("reload refused, keeping the running config: %s", line)

    # --- life cycle ---

    def serve(self) -> None:
        api = self.config.api
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
        self.loop.start()
        self.loop.wait_first_round(timeout=max(5.0, 2 * self.config.daemon.interval))
        app = create_app(self, Authenticator(token, api.allow_unauthenticated))
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
                http=PeerCredProtocol,
                timeout_graceful_shutdown=3,
            ),
            self,
        )
        log.info("serving /metrics, /healthz and /v1 on http://%s%s", api.listen,
                 f" and {api.socket}" if api.socket else "")
        try:
            asyncio.run(server.serve(sockets=sockets))
        finally:
            self.close()

    def close(self) -> None:
        self.loop.stop()
        self.controller.shutdown()
        self.runner.close()
        log.info("governor stopped")
