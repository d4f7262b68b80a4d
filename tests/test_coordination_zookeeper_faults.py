"""ZooKeeper's "not now" (keel.coordination.backends.zookeeper, `_UNAVAILABLE`): a server that
is down, restarting, not serving yet, throttling or read-only is the retryable
`BackendUnavailable`, as Redis's ``LOADING`` (tests/test_coordination_redis.py) and etcd's
"no leader" (tests/test_coordination_etcd_faults.py) are; refusals of the caller's rights stay
non-retryable."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from kazoo import exceptions as kz
from kazoo.handlers.threading import KazooTimeoutError

import keel.coordination as kc
import servers
from keel.coordination.backends import zookeeper
from keel.coordination.backends.base import map_errors
from keel.coordination.backends.zookeeper import _UNAVAILABLE
from keel.errors import BackendUnavailable, CoordinationError

pytestmark = pytest.mark.timeout(60)

_NOT_NOW = [
    kz.ConnectionLoss,  # the connection dropped: a restart, a partition
    kz.ConnectionDropped,
    kz.SessionExpiredError,
    kz.OperationTimeoutError,
    KazooTimeoutError,  # no server answered within the connect timeout
    kz.ThrottledOpError,  # 3.7+: "the server throttled the operation, retry"
    kz.NotReadOnlyCallError,  # a member without quorum serves reads only
    kz.SessionMovedError,  # the session moved to another member meanwhile
    kz.RequestTimeoutError,
]
_REFUSED = [kz.NoAuthError, kz.AuthFailedError, kz.BadArgumentsError, kz.InvalidACLError]


def _mapped(exc: BaseException) -> BaseException:
    try:
        with map_errors(_UNAVAILABLE, backend="zookeeper", url="zookeeper://127.0.0.1:1"):
            raise exc
    except Exception as out:
        return out
    raise AssertionError("map_errors swallowed the error")


@pytest.mark.parametrize("error", _NOT_NOW, ids=lambda e: e.__name__)
def test_not_now_is_retryable(error: type[Exception]) -> None:
    assert isinstance(_mapped(error()), BackendUnavailable)


@pytest.mark.parametrize("error", _REFUSED, ids=lambda e: e.__name__)
def test_refusals_stay_typed_and_not_retryable(error: type[Exception]) -> None:
    out = _mapped(error())
    assert isinstance(out, CoordinationError)
    assert not isinstance(out, BackendUnavailable)


async def test_a_restarting_server_is_backend_unavailable_and_ridden_out() -> None:
    """Through a real restart: while the server is down, and while it starts and is not
    serving yet, every call fails with `BackendUnavailable` and nothing else; a waiting
    acquire rides it out."""
    url = servers.server_url("zookeeper")
    coord = await kc.connect(url, member_id="a", ttl=2)
    errors: list[BaseException] = []
    try:
        await asyncio.to_thread(servers.stop, "zookeeper")
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await coord.try_acquire("zk-restart")
            assert time.monotonic() - started < 10
            waiting = asyncio.create_task(coord.acquire("zk-restart", timeout=60))
            starting = asyncio.create_task(asyncio.to_thread(servers.resume, "zookeeper"))
            # Ask again and again while it comes up: each answer is a lock or "not now".
            while not starting.done():
                try:
                    got = await coord.try_acquire("zk-restart-probe")
                except BackendUnavailable:
                    pass
                except Exception as exc:  # anything else would not be retried by callers
                    errors.append(exc)
                else:
                    if got is not None:
                        await got.release()
                await asyncio.sleep(0.05)
            await starting
        finally:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(servers.resume, "zookeeper")
        held = await asyncio.wait_for(waiting, 30)
        held.check()
        await held.release()
    finally:
        await coord.close()
    assert errors == [], errors


async def test_a_watch_whose_answers_all_fail_leaves_none_unobserved() -> None:
    """`_Turn.watch` pipelines one ``get`` per node and reads the answers in order: when the
    connection drops under it, the first failure is raised and the others (ConnectionLoss
    too) must not be left for asyncio to log as never retrieved (CI, a cluster node killed
    under load). The conftest's teardown fails this test if one is."""
    coord = await kc.connect(servers.server_url("zookeeper"), member_id="w", ttl=5)
    try:
        backend = coord.backend
        assert isinstance(backend, zookeeper.ZookeeperBackend)
        client = backend._client

        def lost(*args: object, **kwargs: object) -> object:
            result = client.handler.async_result()
            result.set_exception(kz.ConnectionLoss())
            return result

        client.get_async = lost
        turn = zookeeper._Turn(backend, zookeeper._Attempt(node="n-0000000003"), "/keel/w")
        with pytest.raises(BackendUnavailable):
            await turn.watch(["n-0000000001", "n-0000000002"])
        await asyncio.sleep(0.05)  # the other answer's settle runs on the loop
    finally:
        await coord.close()
