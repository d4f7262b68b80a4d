"""A real HTTP receiver for webhook tests: records each request, answers from a script."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: bytes
    status: int


class Receiver:
    def __init__(
        self,
        answer: Callable[[int, dict[str, str], bytes], int],
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``answer(n, headers, body)`` gives the status for the n-th request (from 0)."""
        self.answer = answer
        self.tls = tls
        self.requests: list[Received] = []
        self.connections = 0  # accepted TCP connections, requests or not
        self.arrived = asyncio.Event()
        self._server: asyncio.Server | None = None
        # Closed on exit: a keep-alive connection the hub has not closed yet would otherwise
        # be left to the garbage collector, whose "unclosed transport" warning then fails
        # whichever later test it happens in.
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = self.answer(len(self.requests), headers, body)
                self.requests.append(Received(time.monotonic(), headers, body, status))
                self.arrived.set()
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode())
                await writer.drain()

    async def wait_for(self, n: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while len(self.requests) < n:
                self.arrived.clear()
                await self.arrived.wait()
