"""etcd auth over a coordinator's whole life, against the real etcd of
scripts/servers.d/etcd-tls.sh (https, client certificates, auth on, simple tokens that expire
after ``--auth-token-ttl``, set short there: KEEL_ETCD_TLS_TOKEN_TTL, default 3 s).

A long-running coordinator must not need a restart when etcd stops taking its token: idle past
the token's lifetime while it holds a lock (lease keep-alives do not keep a token alive), or
after any change to etcd's users and roles ("revision of auth store is old"), the next call
logs in again by itself and succeeds. If the password no longer works, that call is a typed
`CredentialsRejected` at once, not a retry loop.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid

import pytest

import keel.coordination as kc
from keel import errors, urls
from tests.servers import server_url

pytestmark = [pytest.mark.timeout(120)]

TOKEN_TTL = float(os.environ.get("KEEL_ETCD_TLS_TOKEN_TTL", "3"))
PASSWORD = os.environ.get("KEEL_ETCD_TLS_PASSWORD", "keel-tls-pw")  # the server's


def _etcdctl(url: str, *args: str, stdin: str = "") -> None:
    """etcdctl as etcd's root user (scripts/servers.d/etcd-tls.sh made it)."""
    parsed = urls.parse(url)
    opts = parsed.options
    subprocess.run(
        [
            "etcdctl",
            "--endpoints",
            f"https://127.0.0.1:{parsed.port}",
            "--cacert",
            opts["ca"],
            "--cert",
            opts["cert"],
            "--key",
            opts["key"],
            "--user",
            f"root:root-{PASSWORD}",
            *args,
        ],
        input=stdin,
        env={**os.environ, "ETCDCTL_API": "3"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )


def _logins(coord: kc.Coordinator) -> int:
    return int(coord.backend._client.logins)  # type: ignore[attr-defined]


async def test_a_coordinator_idle_past_its_token_lifetime_logs_in_again() -> None:
    url = server_url("etcd-tls")
    coord = await kc.connect(url, member_id="token-ttl", ttl=3)
    try:
        name = f"auth-{uuid.uuid4().hex[:8]}"
        async with coord.lock(name + "-held") as held:
            # Only lease keep-alives while the token's lifetime runs out.
            await asyncio.sleep(TOKEN_TTL + 2)
            assert held.fence > 0
            async with coord.lock(name, timeout=10) as second:
                assert second.fence > held.fence
        assert _logins(coord) >= 2
    finally:
        await coord.close()


async def test_a_change_to_etcds_users_does_not_strand_a_coordinator() -> None:
    """A simple token takes the auth store's revision when etcd reads it, so with simple
    tokens "revision of auth store is old" comes only from a change racing a call (JWT
    tokens carry their revision and meet it on every call after a change): this proves that
    the coordinator carries on across a change, not that the race was met."""
    url = server_url("etcd-tls")
    coord = await kc.connect(url, member_id="auth-revision", ttl=3)
    try:
        stranger = f"tmp-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(_etcdctl, url, "user", "add", f"{stranger}:pw-{stranger}")
        await asyncio.to_thread(_etcdctl, url, "user", "delete", stranger)
        async with coord.lock(f"auth-{uuid.uuid4().hex[:8]}", timeout=10) as held:
            assert held.fence > 0
    finally:
        await coord.close()


async def test_a_password_changed_under_a_coordinator_is_a_typed_error_not_a_loop() -> None:
    url = server_url("etcd-tls")
    coord = await kc.connect(url, member_id="auth-passwd", ttl=3)
    new = f"changed-{uuid.uuid4().hex[:8]}"
    try:
        await asyncio.to_thread(
            _etcdctl, url, "user", "passwd", "keel", "--interactive=false", stdin=new + "\n"
        )
        started = asyncio.get_running_loop().time()
        with pytest.raises(errors.CredentialsRejected) as info:
            async with coord.lock(f"auth-{uuid.uuid4().hex[:8]}", timeout=10):
                pass
        assert asyncio.get_running_loop().time() - started < 10
        assert PASSWORD not in str(info.value)
        assert new not in str(info.value)
    finally:
        await asyncio.to_thread(
            _etcdctl, url, "user", "passwd", "keel", "--interactive=false", stdin=PASSWORD + "\n"
        )
        await coord.close()
