"""``rediss+sentinel://``: Redis under Sentinel with TLS to the sentinels and to the data
servers, an ACL user on the servers and another on the sentinels
(scripts/servers.d/redis-sentinel-tls.sh: client certificates required everywhere, the default
user off everywhere).

Asserted: a call over the transport and a lock from the coordinator work end to end; a wrong
password for the servers or for the sentinels is ``CredentialsRejected`` from ``connect``, and
neither password shows in the error; a wrong CA is a ``TLSError``; after the primary is killed,
calls and locks resume on the new primary the sentinels name (over TLS, logged in).
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid

import pytest
from bench._cluster import servers

import keel.coordination
from keel import errors
from keel.messaging import RPCClient, RPCServer, Target, connect
from tests.topology.conftest import cluster_url
from tests.topology.tls_checks import Echo, call_over, lock_over

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

CLUSTER = "redis-sentinel-tls"
PASSWORD = "keel-tls-pw"  # the servers' ACL user (redis-sentinel-tls.sh)
SENTINEL_PASSWORD = "keel-sentinel-pw"  # the sentinels' ACL user
WRONG = "wr0ng-pa55-5ecret"
FAILOVER_BOUND_S = 30.0


def test_the_url_names_tls_sentinels() -> None:
    url = cluster_url(CLUSTER)
    assert url.startswith("rediss+sentinel://")
    for option in ("sentinel_password=", "ca=", "cert=", "key="):
        assert option in url


async def test_a_call_over_tls_sentinels() -> None:
    await asyncio.wait_for(call_over(cluster_url(CLUSTER)), 60)


async def test_a_lock_over_tls_sentinels() -> None:
    assert await asyncio.wait_for(lock_over(cluster_url(CLUSTER)), 60) > 0


@pytest.mark.parametrize(
    "wrong",
    [f":{PASSWORD}@", f"sentinel_password={SENTINEL_PASSWORD}"],
    ids=["server-password", "sentinel-password"],
)
async def test_a_wrong_password_is_credentials_rejected(wrong: str) -> None:
    url = cluster_url(CLUSTER)
    assert wrong in url
    bad = url.replace(wrong, wrong.replace(PASSWORD, WRONG).replace(SENTINEL_PASSWORD, WRONG))
    with pytest.raises(errors.CredentialsRejected) as info:
        await asyncio.wait_for(connect(bad), 30)
    text = str(info.value)
    for secret in (WRONG, PASSWORD, SENTINEL_PASSWORD):
        assert secret not in text
    with pytest.raises(errors.CredentialsRejected):
        await asyncio.wait_for(keel.coordination.connect(bad, member_id="stls-bad", ttl=10), 30)


async def test_a_wrong_ca_is_a_tls_error() -> None:
    url = cluster_url(CLUSTER)
    ca = url.split("ca=", 1)[1].split("&", 1)[0]
    other = ca.rsplit("/", 1)[0] + "/other-ca.pem"
    with pytest.raises(errors.TLSError):
        await asyncio.wait_for(connect(url.replace(f"ca={ca}", f"ca={other}")), 30)


async def test_calls_and_locks_resume_after_the_primary_is_lost() -> None:
    url = cluster_url(CLUSTER)
    await asyncio.to_thread(servers, "status", CLUSTER)
    node = int(await asyncio.to_thread(servers, "leader", CLUSTER))
    transport = await connect(url)
    topic = f"stls-{uuid.uuid4().hex[:8]}"
    try:
        async with RPCServer(transport, Target(topic), [Echo()]):
            client = RPCClient(transport, Target(topic), timeout=5)
            assert await client.call(None, "echo", text="before") == "before"
            killed = time.monotonic()
            await asyncio.to_thread(servers, "kill", CLUSTER, str(node))
            try:
                resumed = 0.0
                for _ in range(int(FAILOVER_BOUND_S / 0.2)):
                    try:
                        if await client.call(None, "echo", text="after") == "after":
                            resumed = time.monotonic()
                            break
                    except errors.KeelError as exc:
                        assert exc.retryable, exc
                        await asyncio.sleep(0.2)
                    if time.monotonic() - killed > FAILOVER_BOUND_S:
                        break
                assert resumed, f"no call succeeded within {FAILOVER_BOUND_S}s of the kill"
                pause = resumed - killed
                print(f"\n{CLUSTER}: killed node {node}; calls resumed {pause:.2f}s after")
                assert int(await asyncio.to_thread(servers, "leader", CLUSTER)) != node
                assert await asyncio.wait_for(lock_over(url), 30) > 0
            finally:
                await asyncio.to_thread(servers, "revive", CLUSTER, str(node))
    finally:
        await transport.close()
    await asyncio.wait_for(call_over(url), 60)  # and with the old primary back (a replica now)
    gc.collect()
