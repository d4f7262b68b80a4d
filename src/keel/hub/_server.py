"""Run the hub's HTTP app with uvicorn inside the caller's event loop.

`HubServer.start` returns once the socket is bound and serving (port 0 picks a free port);
`stop` ends every stream first (so no client waits out a heartbeat), then lets in-flight
requests finish for up to ``grace`` seconds. Signals are the caller's business: the server
installs no signal handlers, so `keel up` and tests decide what Ctrl-C means.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import socket
from collections.abc import Iterator

import uvicorn

from keel.errors import ConfigError
from keel.hub._app import create_app
from keel.hub._core import Hub
from keel.hub._http_protocol import HTTP_PROTOCOL, MAX_HEAD, JsonErrorsWebSockets
from keel.hub._map_feed import MapFeed
from keel.hub._ws import MAX_CLIENT_MESSAGE
from keel.hub.zaqar import ZaqarConfig


@functools.cache  # once per process
def _freeze_startup_objects() -> None:
    """Move what exists once the server runs (modules, the app, the hub) out of the
    collector's reach, once per process. A full collection walked all of it while a
    thousand streams waited: 50-130 ms pauses measured, at the tail of the fan-out latency. It
    changes nothing but what the cycle collector scans."""
    gc.collect()
    gc.freeze()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HubServer:
    def __init__(
        self,
        hub: Hub,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        heartbeat: float = 15.0,
        grace: float = 2.0,
        map_feed: MapFeed | None = None,
        zaqar: ZaqarConfig | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.hub = hub
        self.zaqar = zaqar
        self.tls_cert = tls_cert  # HTTPS with this certificate chain and key (PEM)
        self.tls_key = tls_key
        self.map_feed = map_feed
        self.host = host
        self._port = port
        self.heartbeat = heartbeat
        self.grace = grace
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    @property
    def port(self) -> int:
        assert self._sock is not None, "start() first"
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {self._port} on {self.host} is taken: another process listens "
                    "there; stop it or pick another with --port"
                ) from None
            raise ConfigError(f"cannot listen on {self.host}:{self._port}: {exc}") from None
        self._sock = sock
        config = uvicorn.Config(
            create_app(
                self.hub, heartbeat=self.heartbeat, map_feed=self.map_feed, zaqar=self.zaqar
            ),
            log_level="warning",
            access_log=False,
            lifespan="off",
            http=HTTP_PROTOCOL,
            h11_max_incomplete_event_size=MAX_HEAD,
            timeout_graceful_shutdown=int(max(1, self.grace)),
            # The protocol's own limit, enforced by the WebSocket parser on the frame header:
            # a larger frame is refused (1009) before any of it is buffered.
            ws=JsonErrorsWebSockets,
            ws_max_size=MAX_CLIENT_MESSAGE,
            ssl_certfile=self.tls_cert,
            ssl_keyfile=self.tls_key,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("the hub's HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        _freeze_startup_objects()

    async def stop(self) -> None:
        self.hub.fanout.close_all()
        if self.map_feed is not None:
            await self.map_feed.stop()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        if self._sock is not None:
            self._sock.close()
        self._server = self._task = None

    async def __aenter__(self) -> HubServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
