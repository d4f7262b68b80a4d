"""Keel's Sentinel manager (`keel._redis_client._Sentinels`) under concurrent callers, with
stand-ins for the sentinels (no servers).

After a failover every connection of a client reconnects at once, and each reconnect asks
the sentinels for the primary. redis-py's ``discover_master`` promoted the sentinel that
answered by the index it had when its walk reached it; a caller whose sentinel had moved
meanwhile (another caller's promotion, or Keel's rotation on READONLY) wrote a stale index,
and the list came out with one sentinel twice and another gone: never asked again, and its
client, with its open connections, left unclosed (one TLS connection leaked per failover in
tests/topology/test_redis_sentinel_tls.py). Asserted: the list keeps every sentinel exactly
once whatever the interleaving, the sentinel that answered is asked first next, and closing
the manager closes every sentinel client it made, wherever the list has moved them.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from redis import exceptions as rexc
from redis.asyncio.sentinel import MasterNotFoundError

from keel import _redis_client as rc
from keel import urls

ADDRESSES = [("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)]
PRIMARY = {"ip": "127.0.0.1", "port": 6379, "is_master": True, "is_sdown": False,
           "is_odown": False, "num-other-sentinels": 2}  # fmt: skip


def _manager() -> rc._Sentinels:
    return rc._Sentinels(ADDRESSES, sentinel_kwargs={"socket_connect_timeout": 0.1})


def _answer(sentinel: Any, reply: Any, delays: random.Random | None = None) -> None:
    """Make the sentinel client answer SENTINEL MASTERS with ``reply`` (raised if an
    exception), after a random pause of a few loop turns."""

    async def sentinel_masters() -> Any:
        for _ in range(delays.randint(0, 5) if delays is not None else 0):
            await asyncio.sleep(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    sentinel.sentinel_masters = sentinel_masters


def _ids(sentinels: list[Any]) -> list[int]:
    return sorted(id(s) for s in sentinels)


@pytest.mark.parametrize("seed", range(20))
async def test_concurrent_discovery_keeps_every_sentinel_once(seed: int) -> None:
    delays = random.Random(seed)
    manager = _manager()
    made = list(manager.sentinels)
    try:
        # The first sentinel is down (as the killed primary's host's would be), the second
        # does not know the primary yet, the third does: every caller walks the list, and
        # the promotions cross.
        _answer(made[0], rexc.ConnectionError("down"), delays)
        _answer(made[1], {"keel": {**PRIMARY, "is_master": False}}, delays)
        _answer(made[2], {"keel": PRIMARY}, delays)

        async def rotate() -> None:  # `_SentinelConnection` on READONLY, meanwhile
            for _ in range(10):
                await asyncio.sleep(0)
                manager.sentinels.append(manager.sentinels.pop(0))

        found = await asyncio.gather(
            *(manager.discover_master("keel") for _ in range(30)), rotate()
        )
        assert set(found[:-1]) == {("127.0.0.1", 6379)}
        assert _ids(manager.sentinels) == _ids(made)  # each once: none lost, none twice
    finally:
        await manager.aclose()


async def test_the_sentinel_that_answered_is_asked_first() -> None:
    manager = _manager()
    made = list(manager.sentinels)
    try:
        _answer(made[0], rexc.TimeoutError("silent"))
        _answer(made[1], {"keel": PRIMARY})
        _answer(made[2], {"keel": PRIMARY})
        assert await manager.discover_master("keel") == ("127.0.0.1", 6379)
        assert manager.sentinels[0] is made[1]
        assert _ids(manager.sentinels) == _ids(made)
    finally:
        await manager.aclose()


async def test_no_primary_names_every_sentinel_that_failed() -> None:
    manager = _manager()
    made = list(manager.sentinels)
    try:
        for sentinel in made:
            _answer(sentinel, rexc.ConnectionError("refused"))
        with pytest.raises(MasterNotFoundError) as info:
            await manager.discover_master("keel")
        assert str(info.value).count(" - ") == 3  # one per sentinel asked
        assert manager.sentinels == made
    finally:
        await manager.aclose()


async def test_aclose_closes_every_sentinel_client_made() -> None:
    manager = _manager()
    made = list(manager.sentinels)
    closed: list[int] = []
    for sentinel in made:

        async def aclose(sentinel: Any = sentinel) -> None:
            closed.append(id(sentinel))
            if sentinel is made[0]:
                raise rexc.ConnectionError("closing failed")

        sentinel.aclose = aclose
    # Whatever the list holds by then (a sentinel dropped from it must still be closed).
    manager.sentinels[:] = [made[2], made[2]]
    with pytest.raises(rexc.ConnectionError):
        await manager.aclose()
    assert sorted(closed) == _ids(made)  # the other two as well, though the first failed


async def test_close_closes_the_sentinel_clients_of_a_client() -> None:
    where = rc.target(urls.parse("redis+sentinel://127.0.0.1:1,127.0.0.1:2/keel/0"))
    redis = rc.client(where, socket_connect_timeout=0.1)
    manager = redis.connection_pool.sentinel_manager
    assert isinstance(manager, rc._Sentinels)
    closed: list[int] = []
    for sentinel in manager.sentinels:

        async def aclose(sentinel: Any = sentinel) -> None:
            closed.append(id(sentinel))

        sentinel.aclose = aclose
    await rc.close(redis)
    assert sorted(closed) == _ids(manager.sentinels)
