"""SSE clients for `python -m bench hub`, run in their own process so they do not share the
hub's CPU: `python -m bench._hub_clients PORT CLIENTS TOKEN SUB_ID...` opens CLIENTS
connections spread over the subscriptions, prints READY once every stream answered, records
for each event the delay from its publish time (``data.t``) to the arrival of the bytes that
carry it, and on a line on stdin prints the delays (ms) as JSON and exits.

Each client is a bare `asyncio.Protocol`: the delay is taken when the bytes are handed to
the process, and parsing whole chunks costs the clients' process far less than a coroutine
per line did (with a thousand clients on two cores, that cost showed up in the latency)."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import sys
import time

_T = re.compile(rb'"t":([0-9.]+)')


class _Client(asyncio.Protocol):
    def __init__(self, request: bytes, delays: list[float], ready: asyncio.Semaphore) -> None:
        self.request = request
        self.delays = delays
        self.ready = ready
        self.started = False
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self.buffer + data
        if not self.started:
            head, sep, buffer = buffer.partition(b"\r\n\r\n")
            if not sep:
                self.buffer = head
                return
            self.started = True
            self.ready.release()
        # Frames are written whole, so only a frame cut by the network stays in the buffer.
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self.buffer = buffer
            return
        self.buffer = buffer[end + 2 :]
        for m in _T.finditer(buffer, 0, end):
            self.delays.append((now - float(m.group(1))) * 1000)


async def main(port: int, clients: int, token: str, subs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    delays: list[float] = []
    ready = asyncio.Semaphore(0)
    transports = []
    for i in range(clients):
        request = (
            f"GET /v1/subscriptions/{subs[i % len(subs)]}/stream HTTP/1.1\r\nHost: bench\r\n"
            f"X-Auth-Token: {token}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        transport, _ = await loop.create_connection(
            functools.partial(_Client, request, delays, ready), "127.0.0.1", port
        )
        transports.append(transport)
    for _ in range(clients):
        await ready.acquire()
    print("READY", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    for t in transports:
        t.close()
    print(json.dumps(delays), flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]))
