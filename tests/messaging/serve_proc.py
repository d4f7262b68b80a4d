"""A service run by keel.messaging.serve in its own process, for signal tests.

    python -m tests.messaging.serve_proc SLOW_SECONDS

Prints ``health PORT`` once serving, ``started`` when its own client's slow call is running,
then ``reply VALUE`` or ``error TYPE``, then ``exited`` after serve() returned.
"""

from __future__ import annotations

import asyncio
import sys

from keel.messaging import RequestContext, RPCClient, RPCServer, Runner, Target, connect


class Slow:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = asyncio.Event()

    async def slow(self, ctx: RequestContext) -> str:
        self.started.set()
        await asyncio.sleep(self.seconds)
        return "ok"


async def main() -> None:
    transport = await connect("memory://serve-proc")
    endpoint = Slow(float(sys.argv[1]))
    server = RPCServer(transport, Target("svc", server="svc-1"), [endpoint])
    runner = Runner([server], drain_timeout=20, health_port=0)

    async def client() -> None:
        while server.state.value != "serving":  # noqa: ASYNC110 - polling a plain attribute
            await asyncio.sleep(0.01)
        assert runner.health is not None
        print("health", runner.health.port, flush=True)
        call = asyncio.ensure_future(
            RPCClient(transport, Target("svc"), timeout=60).call(None, "slow")
        )
        await endpoint.started.wait()
        print("started", flush=True)
        try:
            print("reply", await call, flush=True)
        except Exception as exc:
            print("error", type(exc).__name__, flush=True)

    task = asyncio.ensure_future(client())
    await runner.run()
    await asyncio.wait_for(task, 10)
    print("exited", flush=True)


asyncio.run(main())
