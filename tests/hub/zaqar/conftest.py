"""Zaqar API fixtures: a hub behind the real Keystone (scripts/servers start keystone) on every
store, two fresh Keystone projects, and python-zaqarclient made as Heat and Mistral make it.

python-zaqarclient is blocking: tests call it through `sync` (a worker thread) while the hub
serves on the test's event loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from zaqarclient.queues.v2 import client as zaqar

from keel.hub import Hub, HubServer, KeystoneTokens, Store
from keel.hub.zaqar import ZaqarConfig
from tests.hub.test_keystone import ADMIN, Tenant, make_tenant
from tests.servers import server_url

T = TypeVar("T")


async def sync(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(functools.partial(func, *args, **kwargs))


@dataclass
class Zaqar:
    hub: Hub
    url: str
    keystone: str
    config: ZaqarConfig

    def heat(self, tenant: Tenant, token: str) -> zaqar.Client:
        """Heat's ``ZaqarClientPlugin.create_for_tenant``: a token and the project id."""
        opts = {
            "os_auth_token": token,
            "os_auth_url": self.keystone,
            "os_project_id": tenant.project_id,
            "os_service_type": "messaging",
        }
        return zaqar.Client(
            url=self.url, conf={"auth_opts": {"backend": "keystone", "options": opts}}, version=2
        )

    def mistral(self, tenant: Tenant) -> zaqar.Client:
        """Mistral's ``ZaqarAction``: a keystoneauth session, no project header."""
        auth = v3.Password(
            auth_url=self.keystone,
            username=tenant.user,
            password=tenant.password,
            user_domain_id="default",
            project_id=tenant.project_id,
        )
        return zaqar.Client(version=2, url=self.url, session=ks_session.Session(auth=auth))

    def signed(self, signed: dict[str, Any]) -> zaqar.Client:
        """Heat's ``create_from_signed_url``."""
        opts = {k: signed[k] for k in ("paths", "expires", "methods", "signature")}
        opts["os_project_id"] = signed["project"]
        return zaqar.Client(
            url=self.url, conf={"auth_opts": {"backend": "signed-url", "options": opts}}, version=2
        )

    def raw(self, token: str | None = None, **headers: str) -> httpx.AsyncClient:
        base = {"Client-ID": "0e9b0f37-6d2d-4c9a-9a57-1a9a35e7b2a1"}
        if token:
            base["X-Auth-Token"] = token
        return httpx.AsyncClient(base_url=self.url, headers={**base, **headers}, timeout=30)


@pytest.fixture(scope="module")
def keystone() -> str:
    return server_url("keystone")


class Member(Tenant):
    """A tenant whose project token is fetched once (a Keystone login costs a password hash)."""

    _token: str | None = None

    async def token(self, *, scoped: bool = True) -> str:
        if not scoped:
            return await super().token(scoped=False)
        if self._token is None:
            self._token = await super().token()
        return self._token


def _member(keystone: str) -> Member:
    t = asyncio.run(make_tenant(keystone))
    return Member(t.url, t.admin_token, t.project_id, t.user_id, t.user, t.password)


# Made once per module: each costs several Keystone calls, and tests make their own queues.
@pytest.fixture(scope="module")
def alice(keystone: str) -> Member:
    return _member(keystone)


@pytest.fixture(scope="module")
def bob(keystone: str) -> Member:
    return _member(keystone)


async def serve(
    store: Store, keystone: str, config: ZaqarConfig, **hub_options: Any
) -> AsyncIterator[Zaqar]:
    auth = KeystoneTokens(keystone, **ADMIN)
    hub = Hub(store, auth, quota_subscriptions=50, webhook_backoff=(0.2, 0.4), **hub_options)
    await hub.start()
    try:
        async with HubServer(hub, heartbeat=0.5, zaqar=config) as server:
            yield Zaqar(hub, server.url, keystone, config)
    finally:
        await hub.stop()
        await auth.close()


@pytest.fixture
async def zq(store: Store, keystone: str) -> AsyncIterator[Zaqar]:
    async for z in serve(store, keystone, ZaqarConfig(), allow_private_webhooks=True):
        yield z
