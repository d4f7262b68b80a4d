"""Poison benchmark: how many poison bodies per second a server dead-letters while serving calls.

    python -m bench rpc --poison [--transport memory,rabbit,nats,redis] [--seconds S]
                                 [--concurrency C] [--publishers P] [--bombs]

Per transport, one RPC server (max_concurrency 64, Keel's default), C callers calling ``echo``
back to back, first alone (quiet), then while P publishers flood the server's queue with the
poison mix of tests/poison.py (deep nesting, huge integers, truncated frames, wrong versions,
oversize, wrong shapes; one of each in turn, 30 kinds, about 860 KB a round) from a
connection of their own, as a hostile publisher would. A consumer drains the dead-letter
queue meanwhile. The anchor is the same server without the flood, in the same run: the ratio
says what the flood costs the calls. Logging stays on (to /dev/null): one line per poison
body is part of the cost. Figures: dead-lettered poison/s (the server's malformed counter over
the flood), calls/s and call p99 quiet and flooded, calls that failed. With ``--bombs`` the
flood is wide container bombs instead (tests/poison.py's ``bomb_bodies``: up to 500,000 empty
lists or maps in a body under 1 MiB, each refused at a bounded cost, the large ones one at a
time; keel.messaging._heavy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from tests import poison

from bench._servers import url as server_url
from bench._stats import percentile, result_line, table
from keel.messaging import RequestContext, RPCClient, RPCServer, Target, Transport, connect
from keel.messaging._target import rpc_queue

COLUMNS = [
    "transport",
    "poison_per_s",
    "calls_per_s_quiet",
    "calls_per_s_flood",
    "ratio_calls_flood_vs_quiet",
    "p99_ms_quiet",
    "p99_ms_flood",
    "failed_calls",
]


class Echo:
    async def echo(self, ctx: RequestContext, i: int) -> int:
        return i


async def _callers(
    client: RPCClient, seconds: float, concurrency: int
) -> tuple[int, list[float], int]:
    latencies: list[float] = []
    failed = 0
    end = time.monotonic() + seconds

    async def caller(n: int) -> None:
        nonlocal failed
        i = 0
        while time.monotonic() < end:
            started = time.perf_counter()
            try:
                await client.call(None, "echo", i=i)
            except Exception:
                failed += 1
            else:
                latencies.append(time.perf_counter() - started)
            i += 1

    await asyncio.gather(*(caller(n) for n in range(concurrency)))
    return len(latencies), latencies, failed


async def _flood(
    publisher: Transport, queue: str, bodies: list[bytes], stop: asyncio.Event, n: int
) -> None:
    at = n
    while not stop.is_set():
        body = bodies[at % len(bodies)]
        at += 1
        with contextlib.suppress(Exception):  # a refused body is the publisher's problem
            await publisher.send(queue, body, durable=at % 2 == 0)
        await asyncio.sleep(0)  # memory:// sends never suspend; let the server run


async def measure(
    url: str, seconds: float, concurrency: int, publishers: int, *, bombs: bool = False
) -> dict[str, Any]:
    topic = f"poison-bench-{os.getpid()}-{int(time.time())}"
    reader = await connect(url)
    caller_t = await connect(url)
    publisher = await connect(url, max_message_bytes=4 * reader.max_message_bytes)
    sweeper = await connect(url)
    server = RPCServer(reader, Target(topic), [Echo()])
    await server.start()
    queue = rpc_queue(topic)
    await sweeper.declare_queue(queue + ".dlq", durable=True)
    acks: set[asyncio.Task[None]] = set()

    def on_dead(delivery: Any) -> None:
        task = asyncio.get_running_loop().create_task(delivery.ack())
        acks.add(task)
        task.add_done_callback(acks.discard)

    await sweeper.consume(queue + ".dlq", on_dead, prefetch=256)
    client = RPCClient(caller_t, Target(topic), timeout=30)
    await _callers(client, min(1.0, seconds / 4), concurrency)  # warm up
    quiet_n, quiet_lat, quiet_failed = await _callers(client, seconds, concurrency)

    mix = poison.bomb_bodies() if bombs else poison.request_bodies(reader.max_message_bytes)
    bodies = [body for _, body in mix]
    stop = asyncio.Event()
    key = ("keel_rpc_server_requests", "?", "?", "malformed")
    floods = [
        asyncio.ensure_future(_flood(publisher, queue, bodies, stop, n)) for n in range(publishers)
    ]
    await asyncio.sleep(0.5)  # the flood is on before the clock starts
    before = server.counts[key]
    started = time.monotonic()
    flood_n, flood_lat, flood_failed = await _callers(client, seconds, concurrency)
    dead = server.counts[key] - before
    elapsed = time.monotonic() - started
    stop.set()
    await asyncio.gather(*floods)
    await server.stop(timeout=5)
    for transport in (publisher, caller_t, reader):
        with contextlib.suppress(Exception):
            await transport.delete_queue(queue)
        await transport.close()
    with contextlib.suppress(Exception):
        await sweeper.delete_queue(queue + ".dlq")
    await sweeper.close()
    quiet_rate = quiet_n / seconds
    flood_rate = flood_n / elapsed
    return {
        "poison_per_s": dead / elapsed,
        "calls_per_s_quiet": quiet_rate,
        "calls_per_s_flood": flood_rate,
        "ratio_calls_flood_vs_quiet": flood_rate / quiet_rate if quiet_rate else float("nan"),
        "p99_ms_quiet": percentile(quiet_lat, 99) * 1000,
        "p99_ms_flood": percentile(flood_lat, 99) * 1000,
        "failed_calls": quiet_failed + flood_failed,
    }


def _quiet_logs() -> None:
    """Keel's structured lines formatted and written, as a service's would be, to /dev/null."""
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("ts=%(asctime)s level=%(levelname)s %(message)s"))
    root = logging.getLogger("keel")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench rpc --poison")
    parser.add_argument("--transport", default="memory", help="comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--bombs", action="store_true", help="flood with wide container bombs")
    args = parser.parse_args(argv)
    _quiet_logs()
    rows: list[dict[str, Any]] = []
    result: dict[str, float | int | str] = {}
    for transport in args.transport.split(","):
        figures = asyncio.run(
            measure(
                server_url(transport),
                args.seconds,
                args.concurrency,
                args.publishers,
                bombs=args.bombs,
            )
        )
        rows.append({"transport": transport, **figures})
        for name, value in figures.items():
            result[f"{transport}_{name}"] = value
    mix = "wide container bombs" if args.bombs else "poison"
    table(
        f"{mix} flood: {args.concurrency} callers, {args.publishers} poison publishers, "
        f"{args.seconds:g} s per phase",
        COLUMNS,
        rows,
    )
    print(result_line("rpc_poison_bombs" if args.bombs else "rpc_poison", result))
