"""A Keel RPC server in its own process, for kill -9 tests.

    python -m tests.faults.server_proc URL TOPIC NAME LOG SLOW_SECONDS

Every method appends ``<event> <name> <key>`` to LOG (one line, flushed) so the test can see
which process started and finished what, across processes.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from keel.messaging import RequestContext, RPCServer, Target, connect


class Slow:
    def __init__(self, name: str, log: Path, slow: float) -> None:
        self.name, self.log, self.slow = name, log, slow

    def _write(self, what: str, key: str) -> None:
        with self.log.open("a") as f:
            f.write(f"{what} {self.name} {key}\n")

    async def work(self, ctx: RequestContext, key: str) -> str:
        self._write("start", key)
        await asyncio.sleep(self.slow)
        self._write("done", key)
        return self.name

    async def ping(self, ctx: RequestContext) -> str:
        return self.name


async def main() -> None:
    url, topic, name, log, slow = sys.argv[1:6]
    transport = await connect(url)
    server = RPCServer(transport, Target(topic, server=name), [Slow(name, Path(log), float(slow))])
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
