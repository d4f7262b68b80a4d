"""Keel's hand-packed ``Basic.Publish`` (keel.messaging.transports._amqp_publish) is the same
bytes pamqp would write for it, and shares a channel with aiormq's own ``basic_publish``:
confirms, returns and nacks reach the right publisher whichever path sent it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import aiormq.exceptions as amqp_errors
import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

import servers
from keel.messaging.transports import _amqp_publish

pytestmark = pytest.mark.timeout(60)


def _pamqp(number: int, max_body: int, body: bytes, **kw: object) -> bytes:
    props = spec.Basic.Properties(
        content_type=kw["content_type"],  # type: ignore[arg-type]
        content_encoding=kw["content_encoding"],  # type: ignore[arg-type]
        delivery_mode=kw["delivery_mode"],  # type: ignore[arg-type]
        message_id=kw["message_id"],  # type: ignore[arg-type]
    )
    frames: list[object] = [
        spec.Basic.Publish(
            exchange=kw["exchange"],  # type: ignore[arg-type]
            routing_key=kw["routing_key"],  # type: ignore[arg-type]
            mandatory=kw["mandatory"],  # type: ignore[arg-type]
        ),
        ContentHeader(properties=props, body_size=len(body)),
    ]
    frames += [ContentBody(body[i : i + max_body]) for i in range(0, len(body), max_body)]
    return ChannelFrame.marshall(number, frames).payload  # type: ignore[arg-type]


@pytest.mark.parametrize("body_size", [0, 1, 99, 100, 101, 1000])
@pytest.mark.parametrize(
    ("content_type", "content_encoding"),
    [(None, None), ("application/json", "utf-8"), ("text/plain", None), (None, "gzip")],
)
@pytest.mark.parametrize("mandatory", [False, True])
def test_the_frames_are_pamqps_bytes(
    body_size: int, content_type: str | None, content_encoding: str | None, mandatory: bool
) -> None:
    kw: dict[str, object] = {
        "exchange": "keel",
        "routing_key": "notifications.info.é",  # a name is UTF-8 on the wire
        "delivery_mode": 2,
        "message_id": "ab12-7",
        "content_type": content_type,
        "content_encoding": content_encoding,
        "mandatory": mandatory,
    }
    body = bytes(range(256)) * 4
    body = body[:body_size]
    mine = _amqp_publish.frames(7, 100, body=body, **kw)  # type: ignore[arg-type]
    assert mine == _pamqp(7, 100, body, **kw)


def test_a_name_too_long_for_a_short_string_is_left_to_aiormq() -> None:
    common: dict[str, object] = {
        "delivery_mode": 1,
        "message_id": "x",
        "content_type": None,
        "content_encoding": None,
        "mandatory": False,
    }
    assert _amqp_publish.frames(1, 100, "", "k" * 256, b"", **common) is None  # type: ignore[arg-type]
    assert _amqp_publish.frames(1, 100, "e" * 256, "k", b"", **common) is None  # type: ignore[arg-type]
    assert _amqp_publish.frames(1, 100, "", "k" * 255, b"", **common) is not None  # type: ignore[arg-type]


@pytest.fixture
async def connection() -> AsyncIterator[Any]:
    url = servers.server_url("rabbitmq").replace("rabbit://", "amqp://", 1)
    opened = await aiormq.connect(url)
    yield opened
    await opened.close()


async def _publish(channel: object, queue: str, i: int, *, mandatory: bool = False) -> object:
    return await _amqp_publish.publish(
        channel,
        str(i).encode(),
        exchange="",
        routing_key=queue,
        delivery_mode=2,
        content_type=None,
        content_encoding=None,
        mandatory=mandatory,
        timeout=30,
    )


async def test_both_paths_on_one_confirming_channel(connection: Any) -> None:
    """Confirms are matched by delivery tag, counted by the channel: hand-packed publishes
    interleaved with aiormq's (which Keel still uses for a message with headers) all get
    their own ack, a mandatory one nobody routes gets its return, and every message is on the
    queue in the order published."""
    channel: Any = await connection.channel(publisher_confirms=True)
    queue = f"amqp-publish-{uuid.uuid4().hex[:8]}"
    await channel.queue_declare(queue, durable=True)

    async def theirs(i: int) -> object:
        return await channel.basic_publish(
            str(i).encode(),
            routing_key=queue,
            properties=spec.Basic.Properties(delivery_mode=2, headers={"n": i}),
        )

    answers = await asyncio.gather(
        *(theirs(i) if i % 3 == 0 else _publish(channel, queue, i) for i in range(300))
    )
    assert all(isinstance(a, spec.Basic.Ack) for a in answers), answers[:5]
    with pytest.raises(amqp_errors.PublishError):
        await _publish(channel, f"{queue}-nobody", 0, mandatory=True)
    assert not channel.message_id_delivery_tag  # nothing left behind per message
    assert not channel.confirmations
    got = []
    for _ in range(300):
        message = await channel.basic_get(queue, no_ack=True)
        got.append(int(message.body))
    assert got == list(range(300))
    await channel.queue_delete(queue)


async def test_an_unconfirmed_channel_returns_once_written(connection: Any) -> None:
    channel = await connection.channel(publisher_confirms=False)
    queue = f"amqp-plain-{uuid.uuid4().hex[:8]}"
    await channel.queue_declare(queue, auto_delete=False)
    answers = await asyncio.gather(*(_publish(channel, queue, i) for i in range(200)))
    assert answers == [None] * 200
    ok = await channel.queue_declare(queue, passive=True)
    for _ in range(50):  # unconfirmed: the broker counts them as it routes them
        if ok.message_count == 200:
            break
        await asyncio.sleep(0.05)
        ok = await channel.queue_declare(queue, passive=True)
    assert ok.message_count == 200
    await channel.queue_delete(queue)


async def test_a_closed_channel_fails_the_wait(connection: Any) -> None:
    """A publish waiting for its confirm when the channel closes fails (aiormq's close
    error), rather than waiting out its timeout."""
    channel = await connection.channel(publisher_confirms=True)
    queue = f"amqp-close-{uuid.uuid4().hex[:8]}"
    await channel.queue_declare(queue, auto_delete=True)
    pending = [asyncio.create_task(_publish(channel, queue, i)) for i in range(50)]
    await asyncio.sleep(0)
    await channel.close()
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
    assert all(isinstance(r, (spec.Basic.Ack, BaseException)) for r in results)
