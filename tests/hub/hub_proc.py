"""A hub in its own process for fault tests: `python -m tests.hub.hub_proc DB TOKENS PORT`.

Prints ``READY <port>`` once it serves; runs until killed.
"""

from __future__ import annotations

import asyncio
import sys

from keel.hub import Hub, HubServer, SQLiteStore, StaticTokens


async def main(db: str, tokens: str, port: int) -> None:
    store = SQLiteStore(db)
    await store.open()
    hub = Hub(store, StaticTokens.from_file(tokens))
    await hub.start()
    server = HubServer(hub, "127.0.0.1", port)
    await server.start()
    print(f"READY {server.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
