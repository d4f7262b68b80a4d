"""Attack tests of Keel's Sentinel manager (`keel._redis_client._Sentinels`), `close` and the
Redis transport's failed `connect` (commit f17a097), with stand-ins for the sentinels and,
for the transport, a local socket that accepts and never answers (no Redis server).

Asserted: ``discover_master`` gives, for every outcome of every sentinel, what redis-py's
original gives on the same answers (the result or the exception, and the order the list
is left in when callers do not overlap), except that a sentinel's ``ResponseError`` makes
Keel's ask the next one (raised only when every sentinel refuses; redis-py raises the first),
``check_master_state`` false, ``force_master_ip``, ``min_other_sentinels`` and empty
answers count alike; ``aclose`` closes every client even when one raises, twice is
harmless; `close` works on a client without Sentinel; a connect cancelled stays
``CancelledError``, a ``KeyboardInterrupt`` is not swallowed, and either way the client is
closed.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
from redis import exceptions as rexc
from redis.asyncio.sentinel import Sentinel

from keel import _redis_client as rc
from keel import urls
from keel.errors import TransportError
from keel.messaging.transports import redis as redis_transport
from keel.messaging.transports.redis import RedisTransport

pytestmark = pytest.mark.timeout(10)

ADDRESSES = [("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)]
PRIMARY = {"ip": "127.0.0.1", "port": 6379, "is_master": True, "is_sdown": False,
           "is_odown": False, "num-other-sentinels": 2}  # fmt: skip

# What one sentinel may answer to SENTINEL MASTERS (an exception: raised).
OUTCOMES: dict[str, Any] = {
    "primary": {"keel": PRIMARY},
    "other-port": {"keel": {**PRIMARY, "ip": "127.0.0.2", "port": 6380}},
    "replica": {"keel": {**PRIMARY, "is_master": False}},
    "sdown": {"keel": {**PRIMARY, "is_sdown": True}},
    "odown": {"keel": {**PRIMARY, "is_odown": True}},
    "lonely": {"keel": {**PRIMARY, "num-other-sentinels": 0}},
    "no-masters": {},
    "other-service": {"other": PRIMARY},
    "empty-state": {"keel": {}},
    "conn-error": rexc.ConnectionError("refused"),
    "timeout": rexc.TimeoutError("silent"),
    "auth": rexc.AuthenticationError("bad password"),  # a ConnectionError
    "response": rexc.ResponseError("ERR unknown command"),
    "no-perm": rexc.NoPermissionError("NOPERM sentinel"),  # a ResponseError
    "busy": rexc.BusyLoadingError("LOADING"),  # a ConnectionError
    "os-timeout": TimeoutError("builtin"),  # not redis-py's: neither catches it
}


def _manager(**kwargs: Any) -> rc._Sentinels:
    return rc._Sentinels(ADDRESSES, sentinel_kwargs={"socket_connect_timeout": 0.1}, **kwargs)


def _answer(sentinel: Any, reply: Any) -> None:
    async def sentinel_masters() -> Any:
        await asyncio.sleep(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    sentinel.sentinel_masters = sentinel_masters


async def _outcome(call: Coroutine[Any, Any, Any], made: list[Any]) -> tuple[Any, ...]:
    """The result, or the exception's type and message (each sentinel's repr replaced by its
    position in ``made``, the two managers' clients being different objects)."""
    try:
        return ("ok", await call)
    except Exception as exc:
        text = str(exc)
        for n, sentinel in enumerate(made):
            text = text.replace(str(sentinel), f"<sentinel {n}>")
        return ("raised", type(exc), text)


@pytest.fixture
async def pair() -> AsyncIterator[list[tuple[rc._Sentinels, list[Any]]]]:
    """Two managers of the same sentinels: one walked by Keel's discover_master, one by
    redis-py's (called on a `_Sentinels`, so both see the same ``check_master_state``)."""
    managers = [_manager(), _manager()]
    try:
        yield [(m, list(m.sentinels)) for m in managers]
    finally:
        for m in managers:
            await m.aclose()


class _AskNext(rexc.ConnectionError):
    """What redis-py is given in place of a sentinel's refusal: Keel asks the next sentinel
    after one (redis-py raises it), and names it as it was."""

    def __init__(self, refusal: rexc.ResponseError) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal

    def __repr__(self) -> str:
        return repr(self.refusal)


async def _compare(pair: list[tuple[rc._Sentinels, list[Any]]], combo: tuple[str, ...]) -> None:
    (ours, ours_made), (orig, orig_made) = pair
    for manager, made in pair:
        manager.sentinels[:] = made
        for sentinel, name in zip(made, combo, strict=True):
            reply = OUTCOMES[name]
            if manager is orig and isinstance(reply, rexc.ResponseError):
                reply = _AskNext(reply)
            _answer(sentinel, reply)
    got = await _outcome(ours.discover_master("keel"), ours_made)
    want = await _outcome(Sentinel.discover_master(orig, "keel"), orig_made)
    refusals = [OUTCOMES[name] for name in combo]
    if all(isinstance(r, rexc.ResponseError) for r in refusals):
        want = ("raised", type(refusals[0]), str(refusals[0]))  # a configuration error
    assert got == want, combo
    order = [ours_made.index(s) for s in ours.sentinels]
    assert order == [orig_made.index(s) for s in orig.sentinels], combo


async def test_discover_master_matches_redis_py_for_every_outcome_of_one_sentinel(
    pair: list[tuple[rc._Sentinels, list[Any]]],
) -> None:
    """Each outcome at each position, the other two sentinels down / knowing the primary."""
    for name in OUTCOMES:
        for position in range(3):
            for others in ("conn-error", "primary", "replica"):
                combo = [others] * 3
                combo[position] = name
                await _compare(pair, tuple(combo))


async def test_discover_master_matches_redis_py_on_random_combinations(
    pair: list[tuple[rc._Sentinels, list[Any]]],
) -> None:
    rnd = random.Random(19)
    names = list(OUTCOMES)
    for _ in range(300):
        await _compare(pair, tuple(rnd.choice(names) for _ in range(3)))


async def test_a_sentinel_that_refuses_does_not_hide_the_others(
    pair: list[tuple[rc._Sentinels, list[Any]]],
) -> None:
    """redis-py lets a ResponseError out of discover_master (only ConnectionError and
    TimeoutError mean "ask the next"): a sentinel that refuses SENTINEL MASTERS (an ACL
    without it) hid the ones after it. Keel's asks them; only a refusal from every sentinel
    is raised."""
    (ours, made), _ = pair
    _answer(made[0], rexc.NoPermissionError("NOPERM"))
    _answer(made[1], {"keel": PRIMARY})
    _answer(made[2], {"keel": PRIMARY})
    assert await ours.discover_master("keel") == ("127.0.0.1", 6379)
    assert ours.sentinels == [made[1], made[0], made[2]]
    with pytest.raises(rexc.NoPermissionError):
        await Sentinel.discover_master(_manager_like(made), "keel")
    for sentinel in made:
        _answer(sentinel, rexc.NoPermissionError("NOPERM"))
    with pytest.raises(rexc.NoPermissionError):
        await ours.discover_master("keel")


def _manager_like(made: list[Any]) -> Any:
    """A bare object redis-py's discover_master can walk (its attributes only)."""

    class Bare:
        def __init__(self) -> None:
            self.sentinels = list(made)
            self.min_other_sentinels = 0
            self._force_master_ip = None

        check_master_state = Sentinel.check_master_state

    return Bare()


@pytest.mark.parametrize(
    "kwargs", [{"force_master_ip": "10.0.0.9"}, {"min_other_sentinels": 2}, {}]
)
async def test_options_act_as_in_redis_py(kwargs: dict[str, Any]) -> None:
    managers = [_manager(**kwargs), _manager(**kwargs)]
    try:
        pair = [(m, list(m.sentinels)) for m in managers]
        for combo in itertools.product(["primary", "lonely", "other-port", "conn-error"], repeat=3):
            await _compare(pair, combo)
        ours, made = pair[0]
        for sentinel in made:
            _answer(sentinel, OUTCOMES["primary"])
        host, port = await ours.discover_master("keel")
        assert host == kwargs.get("force_master_ip", "127.0.0.1")
        assert port == 6379
    finally:
        for m in managers:
            await m.aclose()


async def test_a_cancelled_walk_leaves_the_list_whole() -> None:
    manager = _manager()
    made = list(manager.sentinels)
    try:
        gate = asyncio.Event()

        async def hang() -> Any:
            await gate.wait()
            return {"keel": PRIMARY}

        _answer(made[0], rexc.ConnectionError("down"))
        made[1].sentinel_masters = hang
        walk = asyncio.create_task(manager.discover_master("keel"))
        for _ in range(5):
            await asyncio.sleep(0)
        walk.cancel()
        with pytest.raises(asyncio.CancelledError):
            await walk
        assert manager.sentinels == made
    finally:
        await manager.aclose()


# --- aclose and close -------------------------------------------------------------------


async def test_aclose_with_failures_closes_the_rest_and_raises_the_first() -> None:
    manager = _manager()
    made = list(manager.sentinels)
    closed: list[int] = []
    errors = {0: None, 1: rexc.ConnectionError("one"), 2: OSError("two")}
    for n, sentinel in enumerate(made):

        async def aclose(n: int = n) -> None:
            await asyncio.sleep(0)
            closed.append(n)
            if errors[n] is not None:
                raise errors[n]  # type: ignore[misc]

        sentinel.aclose = aclose
    with pytest.raises(rexc.ConnectionError, match="one"):
        await manager.aclose()
    assert sorted(closed) == [0, 1, 2]


async def test_aclose_twice_on_real_clients_is_harmless() -> None:
    manager = _manager()
    await manager.aclose()
    await manager.aclose()


async def test_close_twice_of_a_sentinel_client_without_servers() -> None:
    where = rc.target(urls.parse("redis+sentinel://127.0.0.1:1,127.0.0.1:2/keel/0"))
    redis = rc.client(where, socket_connect_timeout=0.1)
    await rc.close(redis)
    await rc.close(redis)


async def test_close_of_a_client_without_sentinel() -> None:
    redis = rc.client(rc.target(urls.parse("redis://127.0.0.1:1/0")), socket_connect_timeout=0.1)
    assert not hasattr(redis.connection_pool, "sentinel_manager")
    await rc.close(redis)
    await rc.close(redis)


async def test_close_closes_the_sentinels_when_the_client_close_raises() -> None:
    where = rc.target(urls.parse("redis+sentinel://127.0.0.1:1,127.0.0.1:2/keel/0"))
    redis = rc.client(where, socket_connect_timeout=0.1)
    manager = redis.connection_pool.sentinel_manager
    closed: list[int] = []
    for n, sentinel in enumerate(manager.sentinels):

        async def aclose(n: int = n) -> None:
            closed.append(n)

        sentinel.aclose = aclose

    async def broken(*_: Any, **__: Any) -> None:
        raise rexc.ConnectionError("client close failed")

    redis.aclose = broken  # type: ignore[method-assign]
    with pytest.raises(rexc.ConnectionError, match="client close failed"):
        await rc.close(redis)
    assert sorted(closed) == [0, 1]


# --- the transport's failed connect -------------------------------------------------------


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A port on 127.0.0.1 that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
def closes(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every client `_redis_client.close` is called with (and then closes)."""
    seen: list[Any] = []
    close = rc.close

    async def recorded(redis: Any) -> None:
        seen.append(redis)
        await close(redis)

    monkeypatch.setattr(redis_transport._redis_client, "close", recorded)
    return seen


async def test_a_connect_cancelled_stays_cancelled_and_closes_the_client(
    silent_port: int, closes: list[Any]
) -> None:
    t = RedisTransport(urls.parse(f"redis://127.0.0.1:{silent_port}/0"), connect_timeout=5)
    task = asyncio.create_task(t.connect())
    await asyncio.sleep(0.1)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert closes == [t.redis]
    await t.close()


async def test_a_connect_past_its_timeout_is_a_transport_error_and_closes(
    silent_port: int, closes: list[Any]
) -> None:
    t = RedisTransport(urls.parse(f"redis://127.0.0.1:{silent_port}/0"), connect_timeout=0.2)
    with pytest.raises(TransportError, match="connect_timeout"):
        await t.connect()
    assert closes == [t.redis]
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await t.close()  # after the failed connect: a second close of the client is harmless


async def test_a_refused_connect_keeps_its_error_and_closes(closes: list[Any]) -> None:
    t = RedisTransport(urls.parse("redis://127.0.0.1:1/0"), connect_timeout=1)
    with pytest.raises(TransportError) as info:
        await t.connect()
    assert "connect_timeout" not in str(info.value)
    assert closes == [t.redis]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, GeneratorExit])
async def test_a_base_exception_in_connect_is_not_swallowed(
    monkeypatch: pytest.MonkeyPatch, closes: list[Any], exc: type[BaseException]
) -> None:
    """Driven by hand (``send``), inside this task: a KeyboardInterrupt out of a task would
    stop the loop, and pytest with it."""

    async def interrupted(*_: Any) -> None:
        raise exc

    monkeypatch.setattr(redis_transport._redis_client, "check_login", interrupted)
    t = RedisTransport(urls.parse("redis://127.0.0.1:1/0"), connect_timeout=1)
    coro = t.connect()
    with pytest.raises(exc):
        coro.send(None)
    assert closes == [t.redis]


async def test_a_cancel_during_the_cleanup_close_stays_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled again while the failed connect closes the client: still CancelledError
    (not suppressed as an Exception, not turned into a TransportError)."""
    entered = asyncio.Event()
    close = rc.close  # the module patched below is this one

    async def slow_close(_: Any) -> None:
        entered.set()
        await asyncio.sleep(5)

    async def refused(*_: Any) -> None:
        raise rexc.ConnectionError("refused")

    monkeypatch.setattr(redis_transport._redis_client, "check_login", refused)
    monkeypatch.setattr(redis_transport._redis_client, "close", slow_close)
    t = RedisTransport(urls.parse("redis://127.0.0.1:1/0"), connect_timeout=1)
    task = asyncio.create_task(t.connect())
    await asyncio.wait_for(entered.wait(), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await close(t.redis)
