"""A tiny HTTP endpoint for orchestrators: ``/healthz``, ``/livez`` and ``/metrics``.

``/healthz`` (readiness) answers 200 only while every part serves, 503 while starting,
draining or stopped, so a load balancer stops sending work before a drain ends. ``/livez``
answers 200 while the process runs. ``/metrics`` is the Prometheus text format. Anything else
is a 404 with a JSON body. Requests are bounded (8 KiB of headers, 5 s to send them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

MAX_HEADER_BYTES = 8192


class HealthServer:
    def __init__(
        self, status: Callable[[], tuple[bool, dict[str, Any]]], host: str, port: int
    ) -> None:
        self._status = status
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        if len(head) > MAX_HEADER_BYTES:
            await self._send(writer, 431, "application/json", b'{"error": "headers too large"}')
            return
        parts = head.split(b" ", 2)
        path = parts[1].decode("latin-1").split("?")[0] if len(parts) > 1 else ""
        if path == "/healthz":
            ok, detail = self._status()
            await self._send(
                writer, 200 if ok else 503, "application/json", json.dumps(detail).encode()
            )
        elif path == "/livez":
            await self._send(writer, 200, "application/json", b'{"alive": true}')
        elif path == "/metrics":
            await self._send(writer, 200, CONTENT_TYPE_LATEST, generate_latest())
        else:
            body = json.dumps({"error": f"no such path {path!r}; try /healthz, /livez, /metrics"})
            await self._send(writer, 404, "application/json", body.encode())

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, code: int, kind: str, body: bytes) -> None:
        reason = {200: "OK", 404: "Not Found", 431: "Headers Too Large", 503: "Unavailable"}
        writer.write(
            f"HTTP/1.1 {code} {reason.get(code, '')}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
