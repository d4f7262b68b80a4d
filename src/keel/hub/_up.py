"""`keel up`: the hub, its dashboard and a demo compute service on embedded defaults.

Memory transport, SQLite store (in a temporary directory unless ``data_dir`` is given), two
demo tenants with fresh tokens. Ctrl-C (SIGINT) or SIGTERM stops it cleanly: the demo stops
publishing, the listener stops (acking what it committed), streams end, the HTTP server
drains, the store closes; a second signal does not wait for any of that.
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
from keel.hub._serve import run_until_signalled
from keel.hub._server import HubServer
from keel.hub.stores.sqlite import SQLiteStore
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
        server = HubServer(hub, host, port)
        await server.start()
        for principal in tokens.values():
            await hub.create_subscription(principal, DASHBOARD_FILTER)
        demo = DemoCompute(transport, TENANTS, interval=interval)
        demo_task = asyncio.create_task(demo.run())
        print(f"Keel hub and dashboard: {server.url}/", file=out)
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
            demo_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await demo_task
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
