"""`keel up`: the hub, its dashboard and demo services on embedded defaults.

Memory transport, SQLite store (in a temporary directory unless ``data_dir`` is given), two
demo tenants with fresh tokens. A demo compute service emits instance lifecycle notifications
for the tenants' dashboards; the map demo's services (api, compute, image, network, billing)
call and notify each other with the traffic tap on, so the map page shows them live.
Ctrl-C (SIGINT) or SIGTERM stops it cleanly: the demos stop, the listener stops (acking what
it committed), streams end, the HTTP server drains, the store closes; a second signal does not
wait for any of that.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from keel.hub._auth import Principal, StaticTokens, new_token
from keel.hub._core import Hub
from keel.hub._demo_compute import DemoCompute
from keel.hub._ingest import listener
from keel.hub._map_feed import MapFeed
from keel.hub._serve import run_until_signalled
from keel.hub._server import HubServer
from keel.hub.stores.sqlite import SQLiteStore
from keel.map import disable as map_disable
from keel.map import enable as map_enable
from keel.map.demo import DemoServices
from keel.messaging import connect

TENANTS = (("demo-alpha", "alice"), ("demo-beta", "bob"))
DASHBOARD_FILTER = {"types": ["compute.instance.*"]}


async def run_up(
    *,
    host: str = "127.0.0.1",
    port: int = 8780,
    data_dir: Path | None = None,
    interval: float = 1.0,
    out: TextIO = sys.stdout,
    stop: asyncio.Event | None = None,
) -> None:
    stop = stop or asyncio.Event()
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="keel-up-")))
        data_dir.mkdir(parents=True, exist_ok=True)
        # The tap goes on first, so the hub's own listener shows on the map too.
        tap = map_enable(data_dir / "map.db")
        stack.callback(map_disable)
        tokens = {new_token(): Principal(user, project, ("member",)) for project, user in TENANTS}
        auth = StaticTokens(tokens)
        auth.write(data_dir / "tokens.json")
        store = SQLiteStore(data_dir / "hub.db")
        await store.open()
        hub = Hub(store, auth)
        await hub.start()
        transport = await connect("memory://keel-up")
        lis = listener(hub, transport)
        await lis.start()
        services = DemoServices(transport)
        await services.start()
        feed = MapFeed(tap.path)
        await feed.start()
        server = HubServer(hub, host, port, map_feed=feed)
        await server.start()
        for principal in tokens.values():
            await hub.create_subscription(principal, DASHBOARD_FILTER)
        demo = DemoCompute(transport, TENANTS, interval=interval)
        tasks = [asyncio.create_task(demo.run()), asyncio.create_task(services.run(interval))]
        print(f"Keel hub and dashboard: {server.url}/", file=out)
        first = next(iter(tokens))
        print(f"  live service map: {server.url}/map#token={first}", file=out)
        for token, principal in tokens.items():
            print(
                f"  tenant {principal.project} ({principal.user}): token {token}\n"
                f"    {server.url}/#token={token}",
                file=out,
            )
        print(f"  data: {data_dir}   Ctrl-C stops.", file=out, flush=True)
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await services.stop()
            await lis.stop(timeout=5)
            await server.stop()
            await hub.stop()
            await store.close()
            await transport.close()
            print("keel up: stopped", file=out, flush=True)


def main(*, host: str, port: int, data_dir: Path | None, interval: float) -> None:
    run_until_signalled(
        lambda stop: run_up(host=host, port=port, data_dir=data_dir, interval=interval, stop=stop)
    )
