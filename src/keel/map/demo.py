"""Demo services that call and notify each other, to show (and test) the map.

api -> compute.boot -> image.get, network.allocate -> compute.get_host (a cycle, and a chain
three calls deep); image is called by api, compute and network (fan-in); api still calls
image at 1.0 while image offers 1.2 (version skew); compute notifies billing; api casts
compute.resize.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from keel._log import event as log_event
from keel.errors import KeelError
from keel.map._record import MapTap
from keel.messaging import (
    NotificationListener,
    Notifier,
    RequestContext,
    RPCClient,
    RPCServer,
    Target,
    Transport,
    _tap,
    connect,
)

log = logging.getLogger("keel.map.demo")


class Image:
    target = Target(version="1.2")

    async def get(self, ctx: RequestContext, image_id: str) -> dict[str, str]:
        return {"id": image_id, "name": "debian-12"}

    async def list(self, ctx: RequestContext) -> list[str]:
        return ["img-1", "img-2"]


class Network:
    def __init__(self, transport: Transport) -> None:
        self.compute = RPCClient(transport, Target("compute"), timeout=5, service="network")
        self.image = RPCClient(
            transport, Target("image", version="1.2"), timeout=5, service="network"
        )

    async def allocate(self, ctx: RequestContext, instance_id: str) -> dict[str, str]:
        host = await self.compute.call(ctx, "get_host", instance_id=instance_id)
        await self.image.call(ctx, "get", image_id="img-net")
        return {"ip": "10.0.0.5", "host": host}


class Compute:
    def __init__(self, transport: Transport) -> None:
        self.image = RPCClient(
            transport, Target("image", version="1.2"), timeout=5, service="compute"
        )
        self.network = RPCClient(transport, Target("network"), timeout=5, service="compute")
        self.notifier = Notifier(
            transport, "compute.host-1", topics=["notifications"], service="compute"
        )

    async def boot(self, ctx: RequestContext, name: str, image_id: str) -> dict[str, Any]:
        image = await self.image.call(ctx, "get", image_id=image_id)
        port = await self.network.call(ctx, "allocate", instance_id=name)
        await self.notifier.info(ctx, "compute.instance.create.end", {"instance_id": name})
        return {"instance": name, "image": image["name"], "ip": port["ip"]}

    async def get_host(self, ctx: RequestContext, instance_id: str) -> str:
        return "host-1"

    async def resize(self, ctx: RequestContext, instance_id: str, flavor: str) -> None:
        return None


class Billing:
    def __init__(self) -> None:
        self.seen = 0

    async def info(self, ctx: Any, publisher: str, event_type: str, payload: Any, md: Any) -> None:
        self.seen += 1


class DemoServices:
    """The four services (image, network, compute, billing) and the api client, on one transport.

    `keel up` keeps them running beside the hub so its map page has live traffic; `run`
    drives them for a fixed number of requests.
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.parts: list[RPCServer | NotificationListener] = [
            RPCServer(transport, Target("image"), [Image()], service="image"),
            RPCServer(transport, Target("network"), [Network(transport)], service="network"),
            RPCServer(transport, Target("compute"), [Compute(transport)], service="compute"),
            NotificationListener(
                transport, [Target("notifications")], [Billing()], service="billing"
            ),
        ]
        self.compute = RPCClient(transport, Target("compute"), timeout=5, service="api")
        self.image = RPCClient(transport, Target("image", version="1.0"), timeout=5, service="api")
        self.requests = 0

    async def start(self) -> None:
        for part in self.parts:
            await part.start()

    async def stop(self) -> None:
        for part in reversed(self.parts):
            await part.stop()

    async def request(self) -> None:
        """One API request's worth of traffic: a boot, an image list and a resize."""
        n = self.requests
        self.requests += 1
        await self.compute.call(None, "boot", name=f"vm-{n}", image_id="img-1")
        await self.image.call(None, "list")
        await self.compute.cast(None, "resize", instance_id=f"vm-{n}", flavor="m1.large")

    async def run(self, interval: float) -> None:
        """Requests every ``interval`` seconds until cancelled; a failed one is logged."""
        while True:
            try:
                await self.request()
            except KeelError as exc:
                log_event(log, logging.WARNING, "map_demo.request_failed", error=repr(exc))
            await asyncio.sleep(interval)


async def run(url: str, db: str | Path, rounds: int = 20) -> None:
    """Run the demo services on ``url`` for ``rounds`` API requests, recording into ``db``."""
    tap = MapTap(db)
    _tap.install(tap)
    transport = await connect(url)
    try:
        services = DemoServices(transport)
        await services.start()
        for _ in range(rounds):
            await services.request()
        await services.stop()
    finally:
        _tap.install(None)
        tap.close()
        await transport.close()
