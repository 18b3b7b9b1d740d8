"""The API server's idle loop: once a second, not ten times (an idle daemon's wake-ups,
bench/idle_cost.py), and a stop still ends it at once."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import uvicorn

from governor.service.daemon import ApiServer


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    raise AssertionError("no request is made")


def server() -> ApiServer:
    config = uvicorn.Config(app, lifespan="off", log_config=None)
    config.load()
    return ApiServer(config, daemon=None)  # type: ignore[arg-type]


def test_a_stop_wakes_the_idle_loop_without_waiting_for_its_tick(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ApiServer, "TICK", 3600.0)
    s = server()

    async def main() -> None:
        loop = asyncio.create_task(s.main_loop())
        while s._stopping is None:
            await asyncio.sleep(0.01)
        assert not loop.done()
        assert any(name == b"date" for name, _ in s.server_state.default_headers)
        s.should_exit = True
        waker = threading.Thread(target=s._wake)  # as the signal handler does, any thread
        waker.start()
        await asyncio.wait_for(loop, 60)  # far less than the hour-long tick
        waker.join()

    asyncio.run(main())


def test_the_loop_ends_on_its_tick_too() -> None:
    """A stop that does not wake it (should_exit set alone) is seen at the next tick."""
    s = server()
    s.TICK = 0.05

    async def main() -> None:
        loop = asyncio.create_task(s.main_loop())
        await asyncio.sleep(0.1)
        s.should_exit = True
        await asyncio.wait_for(loop, 60)

    asyncio.run(main())
