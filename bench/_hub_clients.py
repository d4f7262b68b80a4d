"""SSE clients for `python -m bench hub`, run in their own process so they do not share the
hub's CPU: `python -m bench._hub_clients PORT TOKEN SUB_ID...` opens CLIENTS connections
spread over the subscriptions, prints READY once every stream answered, records for each
event the delay from its publish time (``data.t``) to its arrival, and on a line on stdin
prints the delays (ms) as JSON and exits."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time

_T = re.compile(rb'"t":([0-9.]+)')


async def client(
    port: int, token: str, sub: str, delays: list[float], ready: asyncio.Semaphore
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /v1/subscriptions/{sub}/stream HTTP/1.1\r\nHost: bench\r\n"
        f"X-Auth-Token: {token}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    ready.release()
    while True:
        line = await reader.readline()
        if not line:
            return
        if line.startswith(b"data:"):
            m = _T.search(line)
            if m:
                delays.append((time.time() - float(m.group(1))) * 1000)


async def main(port: int, clients: int, token: str, subs: list[str]) -> None:
    delays: list[float] = []
    ready = asyncio.Semaphore(0)
    tasks = [
        asyncio.create_task(client(port, token, subs[i % len(subs)], delays, ready))
        for i in range(clients)
    ]
    for _ in range(clients):
        await ready.acquire()
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for t in tasks:
        t.cancel()
    print(json.dumps(delays), flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]))
