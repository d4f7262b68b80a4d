"""One use of each part over a TLS (and logged-in) URL, shared by the TLS test modules: a call
through a server on a fresh topic, and a fenced lock."""

from __future__ import annotations

import uuid

import keel.coordination
from keel.messaging import RPCClient, RPCServer, Target, connect


class Echo:
    async def echo(self, ctx: object, text: str) -> str:
        return text


async def call_over(url: str, timeout: float = 20) -> None:
    transport = await connect(url)
    try:
        topic = f"tls-{uuid.uuid4().hex[:8]}"
        async with RPCServer(transport, Target(topic), [Echo()]):
            client = RPCClient(transport, Target(topic), timeout=timeout)
            assert await client.call(None, "echo", text="over tls") == "over tls"
    finally:
        await transport.close()


async def lock_over(url: str) -> int:
    """The fence of a lock taken and released over ``url``."""
    coord = await keel.coordination.connect(url, member_id="tls-test", ttl=10)
    try:
        async with coord.lock(f"tls-{uuid.uuid4().hex[:8]}", ttl=10) as held:
            assert held.fence > 0
            return held.fence
    finally:
        await coord.close()
