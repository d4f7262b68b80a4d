"""Contenders on RabbitMQ: Keel, oslo.messaging's rabbit driver, raw aio-pika request/reply.

The broker is the one scripts/servers runs (started here if it is not up; honours
KEEL_SERVERS_DIR and KEEL_RABBITMQ_PORT). Each contender uses its own queues and exchange.

* keel-rabbit: bench/_keel_rpc.measure on the rabbit:// URL.
* oslo-rabbit: oslo.messaging's API on its own rabbit driver (bench/_oslo_rpc.py).
* oslo-keel-rabbit: the same oslo.messaging code on Keel's driver, ``keel+rabbit://``.
* aiopika-rabbit: a server consuming a queue (prefetch 64, ack per message) and replying to
  ``reply_to`` with the ``correlation_id``; one client with one exclusive reply queue
  consumed with no_ack; requests and replies unconfirmed, casts persistent and confirmed
  (the same choices Keel makes).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import _oslo_rpc
from bench._keel_rpc import measure
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


async def oslo_rabbit(params: dict[str, Any]) -> dict[str, float]:
    return await _oslo_rpc.measure(rabbit_url(), params)


async def oslo_keel_rabbit(params: dict[str, Any]) -> dict[str, float]:
    """The same oslo.messaging API code, on Keel's driver over the same RabbitMQ."""
    return await _oslo_rpc.measure("keel+" + rabbit_url(), params)


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
    "oslo-keel-rabbit": oslo_keel_rabbit,
    "aiopika-rabbit": aiopika_rabbit,
}
