"""The one way every RPC contender is timed, so the figures of Keel and its anchors compare."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench._stats import percentile

WARMUP = 200


async def time_calls(
    call: Callable[[int], Awaitable[Any]], calls: int, concurrency: int
) -> dict[str, float]:
    """Warm up, then sequential latency (p50, p99) and calls/s, then N-way calls/s."""
    for i in range(WARMUP):
        await call(i)
    samples: list[float] = []
    started = time.perf_counter()
    for i in range(calls):
        t0 = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - t0)
    seq = time.perf_counter() - started

    async def worker(n: int) -> None:
        for i in range(n):
            await call(i)

    share = calls // concurrency
    started = time.perf_counter()
    await asyncio.gather(*(worker(share) for _ in range(concurrency)))
    conc = time.perf_counter() - started
    return {
        "call_p50_ms": percentile(samples, 50) * 1000,
        "call_p99_ms": percentile(samples, 99) * 1000,
        "seq_calls_per_s": calls / seq,
        "conc_calls_per_s": share * concurrency / conc,
    }
