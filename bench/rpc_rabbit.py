"""Contenders on RabbitMQ: Keel, oslo.messaging's rabbit driver, raw aio-pika request/reply.

The broker is the one scripts/servers runs (started here if it is not up; honours
KEEL_SERVERS_DIR and KEEL_RABBITMQ_PORT). Each contender uses its own queues and exchange.

* keel-rabbit: bench/_keel_rpc.measure on the rabbit:// URL.
* oslo-rabbit: oslo.messaging RPCServer (threading executor) + RPCClient.call, casts, and a
  Notifier (messagingv2) measured by a NotificationListener receiving every notification.
  Concurrent calls use 16 threads, as an oslo service would.
* aiopika-rabbit: a server consuming a queue (prefetch 64, ack per message) and replying to
  ``reply_to`` with the ``correlation_id``; one client with one exclusive reply queue
  consumed with no_ack; requests and replies unconfirmed, casts persistent and confirmed
  (the same choices Keel makes).
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench._keel_rpc import measure
from bench._stats import percentile
from bench._timing import time_calls

SERVERS = Path(__file__).resolve().parent.parent / "scripts" / "servers"


def rabbit_url() -> str:
    started = subprocess.run(
        [str(SERVERS), "start", "rabbitmq"], capture_output=True, text=True, check=False
    )
    if started.returncode != 0:
        raise RuntimeError(f"rabbitmq did not start:\n{started.stderr}")
    url = subprocess.run(
        [str(SERVERS), "url", "rabbitmq"], capture_output=True, text=True, check=True
    )
    return url.stdout.strip()


async def keel_rabbit(params: dict[str, Any]) -> dict[str, float]:
    return await measure(rabbit_url(), params)


# --- oslo.messaging --------------------------------------------------------------------------


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


async def oslo_rabbit(params: dict[str, Any]) -> dict[str, float]:
    # A daemon thread, not asyncio.to_thread: oslo's poller threads outlive cleanup() and
    # would hold the default executor's shutdown (and the process) forever.
    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, float]] = loop.create_future()
    url = rabbit_url()

    def run() -> None:
        try:
            result = _oslo_measure(url, params)
        except Exception as exc:
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, result)

    threading.Thread(target=run, daemon=True).start()
    return await done


# --- raw aio-pika ----------------------------------------------------------------------------


async def aiopika_rabbit(params: dict[str, Any]) -> dict[str, float]:
    import aio_pika  # noqa: PLC0415 - only in this contender's process

    url = rabbit_url().replace("rabbit://", "amqp://", 1)
    calls, concurrency = params["calls"], params["concurrency"]
    server_conn = await aio_pika.connect_robust(url)
    client_conn = await aio_pika.connect_robust(url)
    queue_name = f"aiopika-bench-{time.monotonic_ns()}"
    casts = max(1000, calls // 2)
    cast_count = 0
    cast_done = asyncio.Event()

    server_ch = await server_conn.channel(publisher_confirms=False)
    await server_ch.set_qos(prefetch_count=64)
    queue = await server_ch.declare_queue(queue_name, durable=True)

    async def on_request(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal cast_count
        async with message.process():
            if message.reply_to:
                await server_ch.default_exchange.publish(
                    aio_pika.Message(message.body, correlation_id=message.correlation_id),
                    routing_key=message.reply_to,
                )
            else:
                cast_count += 1
                if cast_count >= casts:
                    cast_done.set()

    await queue.consume(on_request)

    client_ch = await client_conn.channel(publisher_confirms=False)
    confirm_ch = await client_conn.channel(publisher_confirms=True)
    reply_queue = await client_ch.declare_queue(exclusive=True, auto_delete=True)
    pending: dict[str, asyncio.Future[bytes]] = {}

    async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    await reply_queue.consume(on_reply, no_ack=True)
    ids = iter(range(1 << 62))
    loop = asyncio.get_running_loop()

    async def call(i: int) -> bytes:
        correlation_id = str(next(ids))
        future: asyncio.Future[bytes] = loop.create_future()
        pending[correlation_id] = future
        await client_ch.default_exchange.publish(
            aio_pika.Message(
                str(i).encode(), correlation_id=correlation_id, reply_to=reply_queue.name
            ),
            routing_key=queue_name,
        )
        return await asyncio.wait_for(future, 30)

    timed = await time_calls(call, calls, concurrency)

    started = time.perf_counter()
    for i in range(casts):
        await confirm_ch.default_exchange.publish(
            aio_pika.Message(str(i).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue_name,
        )
    await asyncio.wait_for(cast_done.wait(), 300)
    cast_elapsed = time.perf_counter() - started
    await queue.delete(if_unused=False, if_empty=False)
    await client_conn.close()
    await server_conn.close()
    return {
        **timed,
        "casts_per_s": casts / cast_elapsed,
    }


CONTENDERS = {
    "keel-rabbit": keel_rabbit,
    "oslo-rabbit": oslo_rabbit,
    "aiopika-rabbit": aiopika_rabbit,
}
