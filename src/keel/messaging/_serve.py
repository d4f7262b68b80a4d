"""The service runner: start servers and listeners, drain them on SIGTERM or SIGINT.

The first signal drains every part at once (the same drain a rolling upgrade uses: new work
stops, started work finishes, unstarted work goes back to the broker), then returns. A second
signal while draining stops at once: running handlers are cancelled and their callers get
`ServerDraining`. The drain deadline (``drain_timeout``, default 25 s) must sit below the
supervisor's kill timeout: Kubernetes' terminationGracePeriodSeconds (30 s by default) or
systemd's TimeoutStopSec (90 s by default); leave a few seconds for the process to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from typing import Any, Protocol

from keel import urls
from keel._health import HealthServer
from keel._log import event

log = logging.getLogger("keel.messaging.serve")

DEFAULT_DRAIN_TIMEOUT = 25.0


class Servable(Protocol):
    async def start(self) -> None: ...

    async def stop(self, timeout: float | None = ...) -> None: ...


class Runner:
    """Runs parts until asked to stop; `request_stop` is what the signal handlers call."""

    def __init__(
        self,
        parts: Sequence[Servable],
        *,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        health_port: int | None = None,
        health_host: str = "127.0.0.1",
    ) -> None:
        self.parts = list(parts)
        self.drain_timeout = drain_timeout
        self._requests = 0
        self._stop = asyncio.Event()
        self._now = asyncio.Event()
        self.health: HealthServer | None = None
        if health_port is not None:
            self.health = HealthServer(self._status, health_host, health_port)

    def _status(self) -> tuple[bool, dict[str, Any]]:
        states = {
            getattr(p, "name", type(p).__name__): str(
                getattr(getattr(p, "state", None), "value", "serving")
            )
            for p in self.parts
        }
        ok = not self._stop.is_set() and all(s == "serving" for s in states.values())
        return ok, {"status": "serving" if ok else "unavailable", "parts": states}

    def request_stop(self) -> None:
        self._requests += 1
        if self._requests == 1:
            event(log, logging.INFO, "serve.draining", timeout=self.drain_timeout)
            self._stop.set()
        else:
            event(log, logging.WARNING, "serve.stop_now")
            self._now.set()

    async def run(self, *, install_signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            if self.health is not None:
                await self.health.start()
            for part in self.parts:
                await part.start()
            event(log, logging.INFO, "serve.serving", parts=len(self.parts))
            await self._stop.wait()
            drain: asyncio.Future[Any] = asyncio.gather(
                *(p.stop(self.drain_timeout) for p in self.parts)
            )
            now: asyncio.Future[Any] = loop.create_task(self._now.wait())
            await asyncio.wait([drain, now], return_when=asyncio.FIRST_COMPLETED)
            if not drain.done():
                # Second signal: a zero deadline cancels what still runs.
                await asyncio.gather(*(p.stop(0) for p in self.parts))
                await drain
            now.cancel()
            event(log, logging.INFO, "serve.stopped")
        finally:
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            if self.health is not None:
                await self.health.stop()


async def serve(
    parts: Sequence[Servable],
    *,
    drain_timeout: float | None = None,
    health_port: int | None = None,
    install_signals: bool = True,
) -> None:
    """Run ``parts`` (RPC servers, listeners) until SIGTERM/SIGINT, then drain them.

    ``drain_timeout`` defaults to ``$KEEL_DRAIN_TIMEOUT`` or 25 s; ``health_port`` to
    ``$KEEL_HEALTH_PORT`` (none: no HTTP endpoint).
    """
    timeout = drain_timeout  # 0 means 0: cancel what runs at the first signal
    if timeout is None:
        timeout = float(urls.from_env("drain_timeout", str(DEFAULT_DRAIN_TIMEOUT)))
    port_text = urls.from_env("health_port", "")
    port = health_port if health_port is not None else (int(port_text) if port_text else None)
    runner = Runner(parts, drain_timeout=timeout, health_port=port)
    with contextlib.suppress(asyncio.CancelledError):
        await runner.run(install_signals=install_signals)
