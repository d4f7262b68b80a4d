"""Fenced read-modify-writes: `fenced_modify` and the examples in docs/coordination-fencing.md,
run as written against a real SQLite file, etcd, Redis and an HTTP app, with a newer holder
cutting in between the read and the write. No update may be lost, and no write of the older
holder accepted after the newer holder's."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aetcd
import httpx
import pytest
import redis.asyncio as aioredis

import servers
from keel.coordination import FencedRegister, fenced_modify
from keel.errors import NotFound, StaleFence

pytestmark = pytest.mark.timeout(60)

DOC = Path(__file__).resolve().parent.parent / "docs" / "coordination-fencing.md"
Hook = Callable[[], Awaitable[None]]


def _example(name: str) -> dict[str, Any]:
    """Run one example block of the doc and return what it defined."""
    found = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert found, f"no example {name!r} in {DOC.name}"
    namespace: dict[str, Any] = {}
    exec(compile(found.group(1), f"{DOC.name}:{name}", "exec"), namespace)
    return namespace


def _run_now(step: Awaitable[None]) -> None:
    """Run a coroutine that never suspends (the SQL example is synchronous underneath)."""
    coro = step.__await__()
    with contextlib.suppress(StopIteration):
        coro.send(None)
        raise AssertionError("the SQL example suspended")


class _CutIn:
    """A client of the resource whose next write first lets ``hook`` run: a newer holder's
    whole read-modify-write, between this holder's read and its write."""

    def __init__(self, inner: Any, write: str) -> None:
        self._inner = inner
        self._write = write
        self.hook: Hook | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._write:
            return attr

        async def write(*args: Any, **kwargs: Any) -> Any:
            hook, self.hook = self.hook, None
            if hook is not None:
                await hook()
            return await attr(*args, **kwargs)

        return write


class _CutInPipeline(_CutIn):
    async def __aenter__(self) -> _CutInPipeline:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._inner.__aexit__(*exc)


class Counter:
    """One counter behind one of the doc's examples: ``modify(fence, change)``, and the same
    with a newer holder's whole ``modify`` cutting in between the read and the write."""

    def __init__(self, modify: Callable[[Any, Any, Callable[[int], int]], Awaitable[int]]) -> None:
        self._modify = modify

    async def modify(self, fence: int, change: Callable[[int], int]) -> int:
        return await self._modify(None, fence, change)

    async def modify_cut_in(self, fence: int, other: Hook) -> int:
        return await self._modify(other, fence, lambda v: v + 1)


@pytest.fixture(params=["sql", "etcd", "redis", "http"])
async def counter(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Counter]:
    kind: str = request.param
    if kind == "sql":
        conn = sqlite3.connect(tmp_path / "bank.db", isolation_level=None)
        conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER, fence INT)")
        conn.execute("INSERT INTO accounts VALUES (1, 0, 0)")
        sql_modify = _example("sql")["sql_modify"]
        sql_cut_in: list[Hook] = []

        def change_sql(change: Callable[[int], int]) -> Callable[[int], int]:
            def cut_in(value: int) -> int:
                if sql_cut_in:  # a DB-API call is synchronous: the other holder runs here
                    _run_now(sql_cut_in.pop()())
                return change(value)

            return cut_in

        async def via_sql(hook: Hook | None, fence: Any, change: Callable[[int], int]) -> int:
            if hook is not None:
                sql_cut_in.append(hook)
            return int(sql_modify(conn, 1, fence, change_sql(change)))

        yield Counter(via_sql)
        conn.close()
    elif kind == "etcd":
        host, port = servers.server_url("etcd").removeprefix("etcd://").split(":")
        etcd = aetcd.Client(host, int(port))
        await etcd.connect()
        key = f"/fencing-test/{uuid.uuid4().hex}".encode()
        etcd_modify = _example("etcd")["etcd_modify"]
        cut = _CutIn(etcd, "transaction")

        async def via_etcd(hook: Hook | None, fence: Any, change: Callable[[int], int]) -> int:
            cut.hook = hook
            return int(await etcd_modify(cut, key, fence, change))

        yield Counter(via_etcd)
        await etcd.delete(key)
        await etcd.close()
    elif kind == "redis":
        client = aioredis.Redis.from_url(servers.server_url("redis"))
        key = f"fencing-test:{uuid.uuid4().hex}"
        redis_modify = _example("redis")["redis_modify"]

        class Client:
            hook: Hook | None = None

            def pipeline(self) -> _CutInPipeline:
                pipe = _CutInPipeline(client.pipeline(), "execute")
                pipe.hook, self.hook = self.hook, None
                return pipe

        cut_client = Client()

        async def via_redis(hook: Hook | None, fence: Any, change: Callable[[int], int]) -> int:
            cut_client.hook = hook
            return int(await redis_modify(cut_client, key, fence, change))

        yield Counter(via_redis)
        await client.delete(key)
        await client.aclose()
    else:
        app = _example("http-server")["app"]
        http_modify = _example("http-client")["http_modify"]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            cut_http = _CutIn(http, "put")

            async def via_http(hook: Hook | None, fence: Any, change: Callable[[int], int]) -> int:
                cut_http.hook = hook
                return int(await http_modify(cut_http, "/counter", fence, change))

            yield Counter(via_http)


async def test_a_newer_holder_cutting_in_loses_no_update(counter: Counter) -> None:
    async def newer() -> None:
        assert await counter.modify(6, lambda v: v + 1) == 1

    # The older holder (fence 5) has read 0; the newer one (6) reads 0 and writes 1; the older
    # one's write of 1 must not land (that would lose the newer one's increment).
    with pytest.raises(StaleFence):
        await counter.modify_cut_in(5, newer)
    with pytest.raises(StaleFence):  # and trying again later, it is refused for good
        await counter.modify(5, lambda v: v + 1)
    assert await counter.modify(7, lambda v: v + 1) == 2


async def test_an_older_holder_cutting_in_loses_no_update(counter: Counter) -> None:
    landed = 0

    async def older() -> None:
        nonlocal landed
        with contextlib.suppress(StaleFence):
            await counter.modify(5, lambda v: v + 1)
            landed += 1

    # The newer holder (6) has read 0; the older one (5) does a whole read-modify-write. It is
    # refused (its read was claimed) or it lands and the newer one's write, computed from the
    # value the older one replaced, must not: either way every landed write counts.
    assert await counter.modify_cut_in(6, older) == landed + 1
    assert await counter.modify(7, lambda v: v + 1) == landed + 2


def test_fenced_modify_claims_the_row_on_read(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    conn.execute("CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER, fence INTEGER)")
    conn.execute("INSERT INTO counters VALUES (1, 0, 0)")

    def increment(fence: int, meanwhile: Callable[[], None] | None = None) -> dict[str, Any]:
        def change(row: dict[str, Any]) -> dict[str, Any]:
            if meanwhile is not None:
                meanwhile()
            return {"n": row["n"] + 1}

        return fenced_modify(
            conn, "counters", where={"id": 1}, columns=["n"], modify=change, fence=fence
        )

    # The older holder (5) has read; the newer one (6) does a whole increment; the older
    # one's write is refused, so its increment (computed from a stale read) is not applied.
    with pytest.raises(StaleFence):
        increment(5, meanwhile=lambda: increment(6))
    # The other way round: the newer holder has claimed the row, the older one cannot.
    older: list[BaseException] = []

    def older_tries() -> None:
        try:
            increment(5)
        except StaleFence as exc:
            older.append(exc)

    increment(6, meanwhile=older_tries)
    assert len(older) == 1
    assert conn.execute("SELECT n, fence FROM counters").fetchone() == (2, 6)
    with pytest.raises(NotFound):
        fenced_modify(conn, "counters", where={"id": 9}, columns=["n"], modify=dict, fence=7)


def test_the_in_process_register_modifies_under_the_fence() -> None:
    register = FencedRegister()
    assert register.modify("k", 3, lambda v: (v or 0) + 1) == 1
    assert register.modify("k", 4, lambda v: v + 1) == 2
    with pytest.raises(StaleFence):
        register.modify("k", 3, lambda v: v + 1)
    assert register.read("k") == (4, 2)
