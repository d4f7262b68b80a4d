"""The hub's PostgreSQL store when its primary is replaced: a primary and a synchronous
streaming replica from scripts/servers (postgres-replica), appends under load, SIGKILL of the
primary, promotion of the replica (`servers failover`, as Patroni would), then the old primary
back as the new one's replica.

Asserted: every append that returned (acknowledged to the hub) is on the new primary; appends
during the switch fail `BackendUnavailable` (retryable), nothing else; the store reconnects to
the new primary by itself (the URL lists both hosts with target_session_attrs=read-write),
and its LISTEN connection resyncs.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import pytest
from bench._cluster import lose_a_node

from keel import errors, urls
from keel.hub.stores.base import Retention, Routed, Subscription
from keel.hub.stores.postgres import PostgresStore
from tests.topology.conftest import cluster_url

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]
CLUSTER = "postgres-replica"


async def test_no_acknowledged_append_is_lost_when_the_primary_is_replaced() -> None:
    url = cluster_url(CLUSTER)
    schema = f"t_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(url, schema=schema, reconnect_max_s=0.5, connect_timeout=3)
    await store.open()
    try:
        changes: list[str] = []
        await store.watch(lambda kind, sub: changes.append(kind))
        sub = Subscription(
            id=f"s-{uuid.uuid4().hex[:8]}",
            project="p",
            user="u",
            spec={},
            created_at=time.time(),
            retention=Retention(max_messages=None),  # a bound would drop the oldest on purpose
        )
        await store.create_subscription(sub)
        acked: list[str] = []
        ok_times: list[float] = []
        retryable: list[BaseException] = []
        unexpected: list[BaseException] = []
        stop = asyncio.Event()

        async def load() -> None:
            for i in range(1_000_000):
                if stop.is_set():
                    return
                event_id = f"e{i}"
                started = time.monotonic()
                try:
                    await store.append(
                        [Routed(event_id, event_id.encode(), (sub.id,))], now=time.time()
                    )
                except errors.BackendUnavailable as exc:
                    retryable.append(exc)
                    await asyncio.sleep(0.05)
                    continue
                except Exception as exc:
                    unexpected.append(exc)
                    await asyncio.sleep(0.05)
                    continue
                acked.append(event_id)
                ok_times.append(started)

        task = asyncio.ensure_future(load())
        try:
            outage = await lose_a_node(
                CLUSTER,
                lambda: ok_times[-1] if ok_times else 0.0,
                before=2.0,
                between=2.0,
                after=2.0,
                failover=True,
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        print(
            f"\n{CLUSTER}: killed node {outage.node}; pause {outage.pause:.2f}s; appends acked "
            f"{len(acked)}, retryable failures {len(retryable)}; listen reconnects "
            f"{store.listen_reconnects}"
        )
        assert not unexpected, unexpected[:5]
        assert outage.pause < 45
        assert outage.back > outage.revived
        # Read what the new primary holds, straight from it.
        primary = urls.parse(url)
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("select not pg_is_in_recovery()")
            rows = await conn.fetch(
                f"select e.body as event from {schema}.messages m join {schema}.events e"
                f" on e.id = m.event_id where m.sub_id = $1",
                sub.id,
            )
            held = {bytes(r["event"]).decode() for r in rows}
        finally:
            await conn.close()
        assert primary.hosts
        lost = [e for e in acked if e not in held]
        assert not lost, (len(lost), len(acked), lost[:20])
        assert store.listen_reconnects >= 1  # the LISTEN connection came back by itself
    finally:
        await store.close()  # a failure must not leave its connections to the next test
