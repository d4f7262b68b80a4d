"""A cloud moving service by service: oslo.messaging code on Keel's driver and native Keel
services call each other on the same transport, both ways, on every Keel transport.

The oslo address (exchange, topic) is the Keel topic ``<exchange>:<topic>``; an oslo
context arrives on the Keel side in the RequestContext's fields (user, project, roles,
request id) and, verbatim, in ``extra["oslo_context"]``; a Keel context reaches an oslo
endpoint as oslo.context's ``to_dict()`` would give it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from keel import errors, sync
from keel.messaging import RequestContext, Target
from tests.oslo import oslo_context, oslo_messaging
from tests.oslo_driver.support import Oslo, Recorder

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # oslo's executor= argument
]

EXCHANGE = "openstack"  # oslo's default control_exchange


@pytest.fixture
def native(oslo: Oslo) -> Iterator[sync.Transport]:
    """A native Keel connection to the broker the oslo side uses."""
    transport = sync.connect(oslo.url.removeprefix("keel+"))
    yield transport
    transport.close()


class Compute:
    """A native Keel endpoint serving what oslo clients of topic ``compute`` call."""

    def __init__(self) -> None:
        self.seen: list[RequestContext] = []
        self.casts = Recorder()

    async def resize(self, ctx: RequestContext, instance: str, flavor: str) -> dict[str, str]:
        self.seen.append(ctx)
        return {"instance": instance, "flavor": flavor, "by": ctx.user or "?"}

    async def reboot(self, ctx: RequestContext, instance: str) -> None:
        self.casts.add(instance)

    async def refuse(self, ctx: RequestContext) -> None:
        raise ValueError("no host has room")


def test_oslo_client_calls_a_native_keel_server(
    oslo: Oslo, native: sync.Transport, topic: str
) -> None:
    endpoint = Compute()
    server = sync.RPCServer(native, Target(f"{EXCHANGE}:{topic}"), [endpoint])
    server.start()
    try:
        client = oslo.client(oslo_messaging.Target(topic=topic), timeout=10)
        ctxt = oslo_context.RequestContext(
            user_id="u-1", project_id="p-1", roles=["member"], request_id="req-1"
        ).to_dict()
        got = client.call(ctxt, "resize", instance="i-1", flavor="m1.small")
        assert got == {"instance": "i-1", "flavor": "m1.small", "by": "u-1"}
        (ctx,) = endpoint.seen
        assert (ctx.user, ctx.project, ctx.roles, ctx.request_id) == (
            "u-1",
            "p-1",
            ("member",),
            "req-1",
        )
        assert ctx.extra["oslo_context"] == ctxt
        client.cast(ctxt, "reboot", instance="i-2")
        assert endpoint.casts.wait_for(1) == ["i-2"]
        with pytest.raises(ValueError, match="no host has room"):  # builtins come back as such
            client.call(ctxt, "refuse")
        with pytest.raises(oslo_messaging.RemoteError) as caught:
            client.call(ctxt, "no_such_method")
        assert caught.value.exc_type == "UnknownMethod"
    finally:
        server.stop()


def test_native_keel_client_calls_an_oslo_server(
    oslo: Oslo, native: sync.Transport, topic: str
) -> None:
    contexts: list[dict[str, Any]] = []
    casts = Recorder()

    class Conductor:
        def build(self, ctxt: dict[str, Any], name: str) -> str:
            contexts.append(ctxt)
            return f"built {name}"

        def note(self, ctxt: dict[str, Any], n: int) -> None:
            casts.add(n)

        def refuse(self, ctxt: dict[str, Any]) -> None:
            raise KeyError("flavor m1.huge")

    oslo.server(oslo_messaging.Target(topic=topic, server="conductor-1"), [Conductor()])
    client = sync.RPCClient(native, Target(f"{EXCHANGE}:{topic}"), timeout=10)
    ctx = RequestContext(user="u-9", project="p-9", roles=("admin",), extra={"region": "r1"})
    assert client.call(ctx, "build", name="vm1") == "built vm1"
    (ctxt,) = contexts
    assert (ctxt["user_id"], ctxt["project_id"], ctxt["roles"], ctxt["region"]) == (
        "u-9",
        "p-9",
        ["admin"],
        "r1",
    )
    assert oslo_context.RequestContext.from_dict(ctxt).project_id == "p-9"
    client.cast(ctx, "note", n=5)
    assert casts.wait_for(1) == [5]
    with pytest.raises(errors.RemoteError) as caught:
        client.call(ctx, "refuse")
    assert caught.value.exc_type == "builtins.KeyError"  # type: ignore[attr-defined]


def test_an_oslo_context_passes_through_a_native_service(
    oslo: Oslo, native: sync.Transport, topic: str
) -> None:
    """oslo caller -> native Keel service -> oslo service: the last one gets the first
    one's context dict as it was sent (nova's auth_token included)."""
    seen: list[dict[str, Any]] = []

    class Volume:
        def attach(self, ctxt: dict[str, Any], volume: str) -> str:
            seen.append(ctxt)
            return f"attached {volume}"

    oslo.server(oslo_messaging.Target(topic=f"{topic}-volume", server="v1"), [Volume()])
    downstream = sync.RPCClient(native, Target(f"{EXCHANGE}:{topic}-volume"), timeout=10)
    done = threading.Event()

    class Api:
        def boot(self, ctx: RequestContext, volume: str) -> str:
            try:
                # A sync method runs in the server's threads: call on through the facade.
                return str(downstream.call(ctx, "attach", volume=volume))
            finally:
                done.set()

    server = sync.RPCServer(native, Target(f"{EXCHANGE}:{topic}"), [Api()])
    server.start()
    try:
        ctxt = oslo_context.RequestContext(
            user_id="u-1", project_id="p-1", auth_token="token-1"
        ).to_dict()
        client = oslo.client(oslo_messaging.Target(topic=topic), timeout=15)
        assert client.call(ctxt, "boot", volume="vol-1") == "attached vol-1"
        assert seen == [ctxt]
    finally:
        server.stop()
