"""A hub in its own process: `python -m tests.hub.hub_proc STORE TOKENS PORT`.

STORE is a SQLite file or a store URL (``postgresql://...?schema=`` is not parsed here: the
schema is the fourth argument). Prints ``READY <port>`` once it serves; runs until killed.
"""

from __future__ import annotations

import asyncio
import sys

from keel.hub import Hub, HubServer, SQLiteStore, StaticTokens, Store


async def main(target: str, tokens: str, port: int, schema: str | None) -> None:
    store: Store
    if target.startswith("postgresql://"):
        from keel.hub.stores.postgres import PostgresStore  # noqa: PLC0415

        store = PostgresStore(target, schema=schema or "keel_hub")
    else:
        store = SQLiteStore(target)
    await store.open()
    hub = Hub(store, StaticTokens.from_file(tokens))
    await hub.start()
    server = HubServer(hub, "127.0.0.1", port)
    await server.start()
    print(f"READY {server.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), (sys.argv[4:] or [None])[0]))
