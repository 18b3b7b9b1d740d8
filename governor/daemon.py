"""The daemon: config -> samplers -> sampling loop -> API, wired in one place.

`governor run` builds a `Daemon` and calls `serve()`. The listening socket is bound
before anything else starts, so a taken port is one clear error and not a half-started
daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import uvicorn

from governor import __version__
from governor.api.app import create_app
from governor.config import Config
from governor.loop import SamplingLoop
from governor.metrics import DaemonMetrics
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


class ApiServer(uvicorn.Server):
    """uvicorn, minus its signal handling.

    uvicorn re-raises a captured SIGTERM once serving stops, which kills the process
    before the daemon has released what it holds. Here SIGTERM and SIGINT only ask the
    server to stop; the daemon cleans up and exits 0.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        def stop(signum: int, _: FrameType | None) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            if self.should_exit and signum == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
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
        self.runner = SamplerRunner(
            build_samplers(config.sources), config.daemon.effective_sampler_timeout
        )
        self.loop = SamplingLoop(self.runner, self.store, self.metrics, config.daemon.interval)

    # --- what the API reads (DaemonView) ---

    def health(self) -> tuple[bool, str]:
        return self.loop.health()

    def latest(self) -> Snapshot | None:
        return self.store.latest

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    # --- life cycle ---

    def serve(self) -> None:
        api = self.config.api
        sock = bind(api.host, api.port)
        log.info(
            "governor %s: config %s; sampling every %g s",
            __version__, self.config_path or "(built-in defaults)", self.config.daemon.interval,
        )
        self.loop.start()
        self.loop.wait_first_round(timeout=max(5.0, 2 * self.config.daemon.interval))
        server = ApiServer(
            uvicorn.Config(
                create_app(self),
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=3,
            )
        )
        log.info("serving /metrics, /healthz and /v1 on http://%s", api.listen)
        try:
            asyncio.run(server.serve(sockets=[sock]))
        finally:
            self.close()

    def close(self) -> None:
        self.loop.stop()
        self.runner.close()
        log.info("governor stopped")
