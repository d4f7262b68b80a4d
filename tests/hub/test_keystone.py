"""KeystoneTokens against a real Keystone (scripts/servers start keystone): principals from
project tokens, unknown and unscoped tokens refused, the validation cache (TTL and the
token's own expiry), the service token renewed when Keystone refuses it, the hub's HTTP API
behind it, and an unreachable Keystone as a 503."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from keel.errors import BackendUnavailable, Unauthorized
from keel.hub import Hub, HubServer, KeystoneTokens, SQLiteStore
from keel.map import demo
from tests.hub.test_hub_serve import Serve
from tests.servers import server_url

ADMIN = {"username": "admin", "password": "keel-admin", "project": "admin"}


def password_auth(user: str, password: str, project_id: str | None) -> dict[str, Any]:
    auth: dict[str, Any] = {
        "identity": {
            "methods": ["password"],
            "password": {"user": {"name": user, "domain": {"id": "default"}, "password": password}},
        }
    }
    if project_id is not None:
        auth["scope"] = {"project": {"id": project_id}}
    return {"auth": auth}


@dataclass
class Tenant:
    url: str
    admin_token: str
    project_id: str
    user_id: str
    user: str
    password: str

    async def token(self, *, scoped: bool = True) -> str:
        async with httpx.AsyncClient() as c:
            r = await c.post(
                f"{self.url}/auth/tokens",
                json=password_auth(self.user, self.password, self.project_id if scoped else None),
            )
        assert r.status_code == 201, r.text
        return r.headers["x-subject-token"]

    async def revoke(self, token: str) -> None:
        async with httpx.AsyncClient() as c:
            r = await c.delete(
                f"{self.url}/auth/tokens",
                headers={"X-Auth-Token": self.admin_token, "X-Subject-Token": token},
            )
        assert r.status_code == 204, r.text


@pytest.fixture(scope="module")
def keystone() -> str:
    return server_url("keystone")


@pytest.fixture
async def tenant(keystone: str) -> Tenant:
    return await make_tenant(keystone)


async def make_tenant(keystone: str) -> Tenant:
    """A fresh project with a member user, made through Keystone's API as an operator would."""
    async with httpx.AsyncClient(base_url=keystone, timeout=30) as c:
        login = password_auth("admin", "keel-admin", None)
        login["auth"]["scope"] = {"project": {"name": "admin", "domain": {"id": "default"}}}
        r = await c.post("/auth/tokens", json=login)
        assert r.status_code == 201, r.text
        admin = {"X-Auth-Token": r.headers["x-subject-token"]}
        name = f"keel-{uuid.uuid4().hex[:8]}"
        project = await c.post(
            "/projects", headers=admin, json={"project": {"name": name, "domain_id": "default"}}
        )
        assert project.status_code == 201, project.text
        user = await c.post(
            "/users",
            headers=admin,
            json={"user": {"name": name, "password": "pw-" + name, "domain_id": "default"}},
        )
        assert user.status_code == 201, user.text
        member = (await c.get("/roles?name=member", headers=admin)).json()["roles"][0]["id"]
        pid, uid = project.json()["project"]["id"], user.json()["user"]["id"]
        r = await c.put(f"/projects/{pid}/users/{uid}/roles/{member}", headers=admin)
        assert r.status_code == 204, r.text
    return Tenant(keystone, admin["X-Auth-Token"], pid, uid, name, "pw-" + name)


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
async def auth(keystone: str) -> AsyncIterator[tuple[KeystoneTokens, Clock]]:
    clock = Clock()
    a = KeystoneTokens(keystone, **ADMIN, cache_ttl=60, clock=clock)
    yield a, clock
    await a.close()


async def test_a_project_token_is_its_user_project_and_roles(
    auth: tuple[KeystoneTokens, Clock], tenant: Tenant
) -> None:
    a, _ = auth
    who = await a.authenticate(await tenant.token())
    assert (who.user, who.project) == (tenant.user_id, tenant.project_id)
    assert "member" in who.roles
    assert "reader" in who.roles  # implied by member
    assert not who.is_admin


async def test_unknown_and_unscoped_tokens_are_refused(
    auth: tuple[KeystoneTokens, Clock], tenant: Tenant
) -> None:
    a, _ = auth
    with pytest.raises(Unauthorized):
        await a.authenticate("gAAAAA-not-a-token")
    with pytest.raises(Unauthorized, match="not scoped"):
        await a.authenticate(await tenant.token(scoped=False))


async def test_the_cache_holds_a_token_until_its_ttl_then_revalidates(
    auth: tuple[KeystoneTokens, Clock], tenant: Tenant
) -> None:
    a, clock = auth
    token = await tenant.token()
    await a.authenticate(token)
    n = a.validations
    await a.authenticate(token)
    assert a.validations == n  # from the cache
    await tenant.revoke(token)
    await a.authenticate(token)  # still cached: revocation is seen after at most cache_ttl
    clock.offset = 61
    with pytest.raises(Unauthorized):
        await a.authenticate(token)
    assert a.validations == n + 1


async def test_the_cache_never_outlives_the_tokens_expiry(keystone: str, tenant: Tenant) -> None:
    clock = Clock()
    a = KeystoneTokens(keystone, **ADMIN, cache_ttl=10 * 86400, clock=clock)
    try:
        token = await tenant.token()
        await a.authenticate(token)
        n = a.validations
        clock.offset = 3601  # the server issues tokens for an hour (keystone.sh)
        await a.authenticate(token)  # Keystone still accepts it (its clock did not move)
        assert a.validations == n + 1
    finally:
        await a.close()


async def test_a_refused_service_token_is_renewed_once(
    auth: tuple[KeystoneTokens, Clock], tenant: Tenant
) -> None:
    a, _ = auth
    await a.authenticate(await tenant.token())
    assert a.service_logins == 1
    assert a._service is not None
    await tenant.revoke(a._service[0])
    who = await a.authenticate(await tenant.token())
    assert who.project == tenant.project_id
    assert a.service_logins == 2


async def test_bad_service_credentials_and_no_keystone_are_unavailable(keystone: str) -> None:
    wrong = KeystoneTokens(keystone, username="admin", password="wrong", project="admin")
    gone = KeystoneTokens("http://127.0.0.1:9/v3", **ADMIN, timeout=2)
    try:
        for a in (wrong, gone):
            with pytest.raises(BackendUnavailable):
                await a.authenticate("anything")
    finally:
        await wrong.close()
        await gone.close()


async def test_the_hub_api_behind_keystone(
    auth: tuple[KeystoneTokens, Clock], tenant: Tenant, tmp_path: Any
) -> None:
    a, _ = auth
    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    hub = Hub(store, a)
    await hub.start()
    try:
        async with HubServer(hub) as server, httpx.AsyncClient(base_url=server.url) as c:
            token = await tenant.token()
            r = await c.post("/v1/subscriptions", json={}, headers={"X-Auth-Token": token})
            assert r.status_code == 201, r.text
            assert r.json()["project"] == tenant.project_id
            assert r.json()["user"] == tenant.user_id
            r = await c.get("/v1/subscriptions", headers={"X-Auth-Token": "nope"})
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "unauthorized"
    finally:
        await hub.stop()
        await store.close()


async def test_keel_hub_serve_with_keystone_and_a_map(
    keystone: str, tenant: Tenant, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's command line: tokens validated by Keystone, the services' map served."""
    map_db = tmp_path / "map.db"
    await demo.run(f"memory://serve-map-{uuid.uuid4().hex[:6]}", map_db, rounds=2)
    monkeypatch.setenv("KEEL_KEYSTONE_PASSWORD", ADMIN["password"])
    serve = Serve(
        [
            "--store", f"sqlite:///{tmp_path}/hub.db",
            "--keystone", keystone,
            "--keystone-user", ADMIN["username"],
            "--keystone-project", ADMIN["project"],
            "--map-db", str(map_db),
            "--port", "0",
        ]
    )  # fmt: skip
    await serve.start()
    try:
        async with httpx.AsyncClient(base_url=serve.url, timeout=30) as c:
            who = {"X-Auth-Token": await tenant.token()}
            r = await c.post("/v1/subscriptions", headers=who, json={"types": ["compute.*"]})
            assert r.status_code == 201, r.text
            assert r.json()["project"] == tenant.project_id
            refused = await c.get("/v1/subscriptions", headers={"X-Auth-Token": "nope"})
            assert refused.status_code == 401
            graph = (await c.get("/v1/map", headers=who)).json()["map"]
            assert {"api", "compute", "image", "network", "billing"} <= set(graph["services"])
        assert await serve.interrupt() == 0
    finally:
        if serve.proc is not None and serve.proc.returncode is None:
            await serve.kill()
