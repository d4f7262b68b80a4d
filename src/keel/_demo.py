"""`keel demo`: call, cast, fanout and notifications on the embedded memory:// transport."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from rich.console import Console
from rich.table import Table

from keel import errors
from keel.messaging import (
    NotificationListener,
    Notifier,
    RequestContext,
    RPCClient,
    RPCServer,
    Target,
    connect,
)

_instance_numbers = itertools.count(1)


class Compute:
    """A toy compute service: the kind of endpoint an OpenStack service exposes."""

    def __init__(self, host: str, notifier: Notifier, log: list[tuple[str, str, str]]) -> None:
        self.host = host
        self.notifier = notifier
        self.log = log
        self.instances: dict[str, str] = {}

    async def boot(self, ctx: RequestContext, name: str, flavor: str) -> dict[str, str]:
        instance_id = f"i-{next(_instance_numbers):04d}"
        self.instances[instance_id] = name
        self.log.append(("call", self.host, f"boot {name} ({flavor}) -> {instance_id}"))
        await self.notifier.info(
            ctx, "compute.instance.create.end", {"instance_id": instance_id, "host": self.host}
        )
        return {"instance_id": instance_id, "host": self.host}

    async def resize(self, ctx: RequestContext, instance_id: str, flavor: str) -> None:
        self.log.append(("cast", self.host, f"resize {instance_id} to {flavor}"))

    async def refresh_cache(self, ctx: RequestContext) -> None:
        self.log.append(("fanout", self.host, "refresh_cache"))

    async def delete(self, ctx: RequestContext, instance_id: str) -> None:
        raise errors.NotFound(f"instance {instance_id} not found", instance_id=instance_id)


class Audit:
    def __init__(self, pool: str, log: list[tuple[str, str, str]]) -> None:
        self.pool = pool
        self.log = log

    async def info(
        self, ctx: RequestContext, publisher_id: str, event_type: str, payload: Any, md: Any
    ) -> None:
        self.log.append(("notify", f"pool {self.pool}", f"{event_type} {payload['instance_id']}"))


async def run_demo(console: Console) -> list[tuple[str, str, str]]:
    log: list[tuple[str, str, str]] = []
    transport = await connect("memory://demo")
    notifier = Notifier(transport, "compute", topics=["notifications"])
    servers = [
        RPCServer(transport, Target("compute", server=host), [Compute(host, notifier, log)])
        for host in ("host-a", "host-b")
    ]
    listeners = [
        NotificationListener(transport, [Target("notifications")], [Audit(pool, log)], pool=pool)
        for pool in ("billing", "search")
    ]
    parts: list[RPCServer | NotificationListener] = [*servers, *listeners]
    for part in parts:
        await part.start()
    client = RPCClient(transport, Target("compute"), timeout=5, service="demo-api")
    ctx = RequestContext(user="alice", project="demo")

    booted = [await client.call(ctx, "boot", name=f"web-{n}", flavor="m1.small") for n in range(4)]
    await client.cast(ctx, "resize", instance_id=booted[0]["instance_id"], flavor="m1.large")
    await client.prepare(server="host-b").cast(ctx, "resize", instance_id="i-9", flavor="m1.xl")
    await client.fanout(ctx, "refresh_cache")
    try:
        await client.call(ctx, "delete", instance_id="i-404")
    except errors.NotFound as exc:
        log.append(("error", "caller", f"NotFound came back typed: {exc}"))
    try:
        await RPCClient(transport, Target("volume"), timeout=0.3).call(ctx, "attach")
    except errors.CallTimeout as exc:
        log.append(("error", "caller", f"CallTimeout: {exc}"))
    await asyncio.sleep(0.2)  # let casts, fanouts and notifications land
    for part in reversed(parts):
        await part.stop()
    await transport.close()
    return log


def main() -> None:
    console = Console()
    console.print("[bold]Keel demo[/bold] on memory:// (the embedded transport)")
    log = asyncio.run(run_demo(console))
    table = Table(title="What happened")
    for column in ("pattern", "where", "what"):
        table.add_column(column)
    for row in log:
        table.add_row(*row)
    console.print(table)
    counts = {
        kind: sum(1 for r in log if r[0] == kind) for kind in ("call", "cast", "fanout", "notify")
    }
    console.print(
        f"{counts['call']} calls answered by two servers, {counts['cast']} casts each run once, "
        f"{counts['fanout']} fanout copies (one per server), {counts['notify']} notifications "
        "(each pool got its own copy)."
    )
