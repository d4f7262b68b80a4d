"""A sentinel whose ACL refuses ``SENTINEL MASTERS`` does not hide the sentinels after it.

redis-py's discover_master raises the first sentinel's ``NOPERM`` and never asks the other
two, so one sentinel with a stale ACL (a rolling change of the sentinels' users) stopped
every connect. Here the first sentinel the URL names refuses, the other two answer: calls and
locks work (a warning names the sentinel that refused); with all three refusing, connect
fails with a typed error that quotes the refusal, not a "no master found"."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator

import pytest
import redis

import keel.coordination
from keel.errors import KeelError
from keel.messaging import connect
from tests.topology.conftest import cluster_url
from tests.topology.tls_checks import call_over, lock_over

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

CLUSTER = "redis-sentinel"
USER = "keel-acl-test"
PASSWORD = "acl-test-pw"
REFUSED = re.escape("no permissions to run the 'sentinel|masters'")


def _sentinels(url: str) -> list[int]:
    hosts = url.split("//", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    return [int(h.rsplit(":", 1)[1]) for h in hosts.split(",")]


def _set_user(port: int, *rules: str) -> None:
    with redis.Redis(host="127.0.0.1", port=port) as sentinel:
        sentinel.execute_command("ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", *rules)


@pytest.fixture
def url() -> Iterator[str]:
    base = cluster_url(CLUSTER)
    ports = _sentinels(base)
    _set_user(ports[0], "+@all", "-sentinel|masters")
    for port in ports[1:]:
        _set_user(port, "+@all")
    try:
        sep = "&" if "?" in base else "?"
        yield f"{base}{sep}sentinel_username={USER}&sentinel_password={PASSWORD}"
    finally:
        for port in ports:
            with redis.Redis(host="127.0.0.1", port=port) as sentinel:
                sentinel.execute_command("ACL", "DELUSER", USER)


async def test_calls_and_locks_pass_a_sentinel_that_refuses(url: str) -> None:
    await asyncio.wait_for(call_over(url), 60)
    assert await asyncio.wait_for(lock_over(url), 60) > 0


async def test_every_sentinel_refusing_is_the_refusal(url: str) -> None:
    for port in _sentinels(url):
        _set_user(port, "+@all", "-sentinel|masters")
    with pytest.raises(KeelError, match=REFUSED):
        await asyncio.wait_for(connect(url), 30)
    with pytest.raises(KeelError, match=REFUSED):
        await asyncio.wait_for(
            keel.coordination.connect(url, member_id=f"acl-{uuid.uuid4().hex[:6]}", ttl=10), 30
        )
