"""A demo compute service for `keel up`: instance lifecycle notifications for a few tenants.

It emits what Nova emits for the common transitions (``compute.instance.create.start`` /
``.end``, ``power_off``, ``power_on``, ``reboot``, ``delete``), with the tenant in the request
context and the instance id, name, state and host in the payload. It is a toy: no
scheduling, no real instances; a failed publish is logged and the loop goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Sequence
from typing import Any

from keel._log import event as log_event
from keel.messaging import Notifier, RequestContext, Transport

log = logging.getLogger("keel.hub.demo")

# state -> [(action, next state)]
_MOVES: dict[str, list[tuple[str, str]]] = {
    "active": [("power_off", "stopped"), ("reboot", "active"), ("delete", "deleted")],
    "stopped": [("power_on", "active"), ("delete", "deleted")],
}
_FLAVORS = ("m1.small", "m1.medium", "m1.large")
_NAMES = ("web", "db", "cache", "worker", "api", "queue")


class DemoCompute:
    def __init__(
        self,
        transport: Transport,
        tenants: Sequence[tuple[str, str]],
        *,
        interval: float = 1.0,
        max_instances: int = 6,
        seed: int | None = None,
    ) -> None:
        """``tenants``: (project, user) pairs."""
        self.tenants = list(tenants)
        self.interval = interval
        self.max_instances = max_instances
        self.rng = random.Random(seed)
        # One service name for both hosts, the map demo's compute: the live map shows one
        # compute service notifying the hub, not one node per host.
        self.hosts = [
            Notifier(transport, f"compute.host-{h}", service="compute") for h in ("a", "b")
        ]
        self.instances: dict[str, dict[str, Any]] = {}
        self._numbers = itertools.count(1)
        self.emitted = 0

    async def _emit(self, inst: dict[str, Any], event_type: str, state: str) -> None:
        inst["state"] = state
        ctx = RequestContext(user=inst["user"], project=inst["project"], service="nova-compute")
        payload = {
            "instance_id": inst["id"],
            "display_name": inst["name"],
            "state": state,
            "host": inst["host"],
            "flavor": inst["flavor"],
            "tenant_id": inst["project"],
        }
        await self.hosts[inst["host_index"]].info(ctx, event_type, payload)
        self.emitted += 1

    async def step(self) -> None:
        live = [i for i in self.instances.values() if i["state"] != "deleted"]
        project, user = self.rng.choice(self.tenants)
        mine = [i for i in live if i["project"] == project]
        if not mine or (len(mine) < self.max_instances and self.rng.random() < 0.35):
            n = next(self._numbers)
            host_index = self.rng.randrange(len(self.hosts))
            inst: dict[str, Any] = {
                "id": f"inst-{n:04d}",
                "name": f"{self.rng.choice(_NAMES)}-{n}",
                "project": project,
                "user": user,
                "flavor": self.rng.choice(_FLAVORS),
                "host": f"host-{'ab'[host_index]}",
                "host_index": host_index,
            }
            self.instances[inst["id"]] = inst
            await self._emit(inst, "compute.instance.create.start", "building")
            await asyncio.sleep(self.interval / 2)
            await self._emit(inst, "compute.instance.create.end", "active")
            return
        inst = self.rng.choice(mine)
        action, after = self.rng.choice(_MOVES[inst["state"]])
        await self._emit(inst, f"compute.instance.{action}.start", inst["state"])
        await asyncio.sleep(self.interval / 2)
        await self._emit(inst, f"compute.instance.{action}.end", after)
        if after == "deleted":
            del self.instances[inst["id"]]

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception as exc:
                log_event(log, logging.WARNING, "demo.publish_failed", error=repr(exc))
            await asyncio.sleep(self.interval)
