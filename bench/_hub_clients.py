"""SSE clients for `python -m bench hub`, run in their own process so they do not share the
hub's CPU: `python -m bench._hub_clients PORT FIRST CLIENTS TOKEN SUB_ID...` opens CLIENTS
connections, the i-th (from FIRST) to subscription i modulo their number, prints READY once
every stream answered, and records for each event the delay from its publish time
(``data.t``) to the arrival of the bytes that carry it, and the sequence numbers each client
saw.

Then it reads one line on stdin: a JSON object of subscription id -> the last sequence number
the hub committed to it. It waits (up to ``WAIT_S``) until every client has seen its
subscription up to there, and prints one JSON line: the delays (ms), how many deliveries are
still missing, how many arrived more than once, how many messages gap events covered (a gap
is the hub saying retention dropped them), and how long the wait took. A delivery that comes
during the wait is late, not lost; one still missing after it is lost.

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

WAIT_S = 60.0
# One SSE frame as the hub writes it: the id, the event name, the data line.
_FRAME = re.compile(rb"id: ([0-9]+)\nevent: ([a-z]+)\ndata: ([^\n]*)\n\n")
_T = re.compile(rb'"t":([0-9.]+)')
_GAP = re.compile(rb'"from": ?([0-9]+), ?"to": ?([0-9]+)')


class _Client(asyncio.Protocol):
    def __init__(
        self, sub: str, request: bytes, delays: list[float], ready: asyncio.Semaphore
    ) -> None:
        self.sub = sub
        self.request = request
        self.delays = delays
        self.ready = ready
        self.started = False
        self.buffer = b""
        self.last = 0  # the highest seq seen
        self.duplicates = 0
        self.gapped = 0

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
        for m in _FRAME.finditer(buffer, 0, end + 2):
            seq = int(m.group(1))
            if seq <= self.last:
                self.duplicates += 1
                continue
            if m.group(2) == b"gap":
                gap = _GAP.search(m.group(3))
                if gap is not None:
                    self.gapped += int(gap.group(2)) - int(gap.group(1)) + 1
            elif (t := _T.search(m.group(3))) is not None:
                self.delays.append((now - float(t.group(1))) * 1000)
            self.last = seq


async def main(port: int, first: int, clients: int, token: str, subs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    delays: list[float] = []
    ready = asyncio.Semaphore(0)
    transports = []
    protocols: list[_Client] = []
    for i in range(first, first + clients):
        sub = subs[i % len(subs)]
        request = (
            f"GET /v1/subscriptions/{sub}/stream HTTP/1.1\r\nHost: bench\r\n"
            f"X-Auth-Token: {token}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        transport, protocol = await loop.create_connection(
            functools.partial(_Client, sub, request, delays, ready), "127.0.0.1", port
        )
        transports.append(transport)
        protocols.append(protocol)
    for _ in range(clients):
        await ready.acquire()
    print("READY", flush=True)
    last: dict[str, int] = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    started = time.monotonic()

    def missing() -> int:
        return sum(max(0, last[p.sub] - p.last) for p in protocols)

    while missing() and time.monotonic() - started < WAIT_S:  # noqa: ASYNC110 - polls counters
        await asyncio.sleep(0.05)
    waited = time.monotonic() - started
    for t in transports:
        t.close()
    report = {
        "delays": delays,
        "missing": missing(),
        "duplicates": sum(p.duplicates for p in protocols),
        "gapped": sum(p.gapped for p in protocols),
        "waited_s": waited,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    asyncio.run(
        main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:])
    )
