"""oslo.messaging's side of `python -m bench rpc`: the same API code on any transport URL.

An oslo.messaging RPCServer (threading executor) and RPCClient: sequential calls,
concurrent calls from 16 threads (as an oslo service would), casts, and a Notifier
(messagingv2) measured by a NotificationListener receiving every notification. With a
``rabbit://`` URL it is oslo's own rabbit driver; with ``keel+<scheme>://`` Keel's driver.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench._stats import percentile


def _oslo_measure(url: str, params: dict[str, Any]) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import oslo_messaging  # noqa: PLC0415
        from oslo_config import cfg  # noqa: PLC0415

    calls, concurrency = params["calls"], params["concurrency"]
    conf = cfg.CONF  # oslo registers some options (tracing) on the global CONF only
    conf([], project="bench")
    transport = oslo_messaging.get_rpc_transport(conf, url=url)
    topic = f"oslo-bench-{time.monotonic_ns()}"
    casts = max(1000, calls // 2)
    cast_done = threading.Event()
    counter = {"casts": 0, "notes": 0}
    lock = threading.Lock()

    class Endpoint:
        def echo(self, ctx: Any, i: int) -> int:
            return i

        def count(self, ctx: Any, i: int) -> None:
            with lock:
                counter["casts"] += 1
                if counter["casts"] >= casts:
                    cast_done.set()

    target = oslo_messaging.Target(topic=topic, server="bench-server")
    server = oslo_messaging.get_rpc_server(transport, target, [Endpoint()], executor="threading")
    server.start()
    client = oslo_messaging.get_rpc_client(
        transport, oslo_messaging.Target(topic=topic), timeout=30
    )
    for i in range(200):
        client.call({}, "echo", i=i)
    samples: list[float] = []
    started = time.perf_counter()
    for i in range(calls):
        t0 = time.perf_counter()
        client.call({}, "echo", i=i)
        samples.append(time.perf_counter() - t0)
    seq = time.perf_counter() - started

    share = calls // concurrency

    def worker() -> None:
        for i in range(share):
            client.call({}, "echo", i=i)

    with ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
        conc = time.perf_counter() - started

    started = time.perf_counter()
    for i in range(casts):
        client.cast({}, "count", i=i)
    if not cast_done.wait(300):
        raise RuntimeError("oslo casts did not all arrive")
    cast_elapsed = time.perf_counter() - started
    server.stop()
    server.wait()

    notes_done = threading.Event()

    class Sink:
        def info(self, ctx: Any, publisher_id: str, event_type: str, payload: Any, md: Any) -> None:
            with lock:
                counter["notes"] += 1
                if counter["notes"] >= casts:
                    notes_done.set()

    ntransport = oslo_messaging.get_notification_transport(conf, url=url)
    ntopic = topic + "-n"
    listener = oslo_messaging.get_notification_listener(
        ntransport,
        [oslo_messaging.Target(topic=ntopic)],
        [Sink()],
        executor="threading",
    )
    listener.start()
    notifier = oslo_messaging.Notifier(
        ntransport, publisher_id="bench", driver="messagingv2", topics=[ntopic]
    )
    started = time.perf_counter()
    for i in range(casts):
        notifier.info({}, "bench.tick", {"i": i})
    if not notes_done.wait(300):
        raise RuntimeError("oslo notifications did not all arrive")
    notify_elapsed = time.perf_counter() - started
    listener.stop()
    listener.wait()
    ntransport.cleanup()
    transport.cleanup()
    return {
        "call_p50_ms": percentile(samples, 50) * 1000,
        "call_p99_ms": percentile(samples, 99) * 1000,
        "seq_calls_per_s": calls / seq,
        "conc_calls_per_s": share * concurrency / conc,
        "casts_per_s": casts / cast_elapsed,
        "notifications_per_s": casts / notify_elapsed,
    }


async def measure(url: str, params: dict[str, Any]) -> dict[str, float]:
    # A daemon thread, not asyncio.to_thread: oslo's poller threads outlive cleanup() and
    # would hold the default executor's shutdown (and the process) forever.
    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, float]] = loop.create_future()

    def run() -> None:
        try:
            result = _oslo_measure(url, params)
        except Exception as exc:
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, result)

    threading.Thread(target=run, daemon=True).start()
    return await done
