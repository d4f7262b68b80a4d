"""Rolling upgrade under load: Keel on each transport (and oslo.messaging where present).

    python -m bench upgrade [--transport memory[,rabbit,nats,redis]] [--clients 4]

Three 1.0 servers under calls and casts from several clients are replaced one by one by 1.1
servers (drain, stop, start); with ``--oslo``, unchanged oslo.messaging code does the same
on RabbitMQ (stop() and wait(), then start), once on oslo's rabbit driver and once on Keel's
driver (``keel+rabbit://``). Printed per run: failed calls, lost casts (sent, never run),
duplicated casts, p99 call latency outside and during the upgrade, and how long each
replacement took.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import random
import time
from collections import Counter
from typing import Any

from bench import _servers as servers
from bench._stats import result_line, table
from bench._upgrade import upgrade_figures
from keel.messaging import RequestContext, RPCClient, RPCServer, Target, connect, remote


class V10:
    target = Target(version="1.0")

    def __init__(self, executed: Counter[str]) -> None:
        self.executed = executed

    async def get(self, ctx: RequestContext, key: str) -> str:
        await asyncio.sleep(0.002)  # a little work, so drains have something to wait for
        return key

    async def put(self, ctx: RequestContext, key: str) -> None:
        await asyncio.sleep(0.002)
        self.executed[key] += 1


class V11(V10):
    target = Target(version="1.1")

    @remote(since="1.1")
    async def get_many(self, ctx: RequestContext, keys: list[str]) -> list[str]:
        await asyncio.sleep(0.002)
        return keys


async def keel_run(url: str, clients: int, settle: float) -> dict[str, Any]:
    executed: Counter[str] = Counter()
    topic = f"upgrade-{time.monotonic_ns()}"

    async def launch(cls: type[V10], name: str) -> RPCServer:
        server = RPCServer(
            await connect(url), Target(topic, server=name), [cls(executed)], presence_interval=0.5
        )
        await server.start()
        return server

    servers = [await launch(V10, f"s{i}") for i in range(3)]
    callers = [
        RPCClient(await connect(url), Target(topic), timeout=30, version_cap="auto")
        for _ in range(clients)
    ]
    window: dict[str, float] = {}
    latencies: list[tuple[float, float]] = []
    failed: list[str] = []
    sent: list[str] = []
    stop = asyncio.Event()

    async def load(client: RPCClient, n: int) -> None:
        for i in range(1_000_000):  # bounded; stopped by the scenario
            if stop.is_set():
                return
            key = f"c{n}-{i}"
            started = time.perf_counter()
            try:
                if await client.can_send_version("1.1"):
                    await client.prepare(version="1.1").call(None, "get_many", keys=[key])
                else:
                    await client.call(None, "get", key=key)
                latencies.append((started, time.perf_counter() - started))
                await client.prepare(idempotency_key=key).cast(None, "put", key=key)
                sent.append(key)
            except Exception as exc:
                failed.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(random.uniform(0, 0.01))

    tasks = [asyncio.ensure_future(load(c, n)) for n, c in enumerate(callers)]
    await asyncio.sleep(settle)
    replacements: list[float] = []
    window["start"] = time.perf_counter()
    for i in range(3):
        began = time.perf_counter()
        await servers[i].drain(timeout=20)
        servers[i] = await launch(V11, f"s{i}")
        replacements.append(time.perf_counter() - began)
        await asyncio.sleep(0.5)
    window["end"] = time.perf_counter()
    await asyncio.sleep(settle)
    stop.set()
    await asyncio.gather(*tasks)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(executed[k] == 0 for k in sent):  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    for server in servers:
        await server.stop()
    return upgrade_figures(
        latencies, failed, sent=sent, executed=executed, window=window, replacements=replacements
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench upgrade")
    parser.add_argument("--transport", default="memory")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--oslo", action="store_true", help="also run oslo.messaging on RabbitMQ")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds of load before and after"
    )
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    totals = {"keel_failed": 0, "keel_lost": 0, "keel_duplicated": 0}
    ratios: list[float] = []
    for transport in args.transport.split(","):
        url = servers.url(transport)
        figures = asyncio.run(keel_run(url, args.clients, args.settle))
        rows.append({"run": f"keel-{transport}", **figures})
        totals["keel_failed"] += figures["failed"]
        totals["keel_lost"] += figures["lost"]
        totals["keel_duplicated"] += figures["duplicated"]
        ratios.append(figures["p99_ratio"])
    result: dict[str, float | int | str] = {**totals, "keel_p99_ratio": max(ratios)}
    if args.oslo:
        oslo_run = importlib.import_module("bench.upgrade_oslo").run
        figures = oslo_run(args.clients, args.settle)
        rows.append({"run": "oslo-rabbit", **figures})
        result["oslo_failed"] = figures["failed"]
        result["oslo_lost"] = figures["lost"]
        # The same unchanged oslo.messaging code, on Keel's driver: stop()/wait() drain.
        figures = oslo_run(args.clients, args.settle, keel=True)
        rows.append({"run": "oslo-api-keel-rabbit", **figures})
        result["oslo_keel_failed"] = figures["failed"]
        result["oslo_keel_lost"] = figures["lost"]
        result["oslo_keel_duplicated"] = figures["duplicated"]
    columns = [
        "run",
        "calls",
        "failed",
        "lost",
        "duplicated",
        "p99_outside_ms",
        "p99_during_ms",
        "p99_ratio",
        "replace_s",
    ]
    table("Rolling upgrade under load: 3 servers 1.0 -> 1.1", columns, rows)
    for row in rows:
        if row.get("first_failure"):
            print(f"{row['run']} first failure: {row['first_failure']}")
    print(result_line("upgrade", result))
