"""Keel's Horizon plugin in a real Horizon (PyPI `horizon`, scripts/servers start horizon) and
headless Chromium (Debian's, through Playwright), with Keystone login: events posted to the
hub change a table's ajax-update rows within a second, the page polls nothing while it
waits (Horizon's default ajax_poll_interval of 2.5 s would have polled the row in
transition), and a second project's page never gets the first one's events."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from keel.hub import Hub, HubServer, KeystoneTokens, SQLiteStore
from tests.hub.test_dashboard import CHROMIUM
from tests.hub.test_keystone import ADMIN, Tenant, make_tenant, password_auth
from tests.servers import server_url

HUB_PORT = int(os.environ.get("KEEL_HORIZON_HUB_PORT", "28181"))
HORIZON_DIR = Path(os.environ.get("KEEL_SERVERS_DIR", "/tmp/keel-servers")) / "horizon"
ROWS = HORIZON_DIR / "demo-rows.json"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        yield b
        await b.close()


async def admin_token(keystone: str) -> str:
    login = password_auth(ADMIN["username"], ADMIN["password"], None)
    login["auth"]["scope"] = {"project": {"name": "admin", "domain": {"id": "default"}}}
    async with httpx.AsyncClient() as c:
        r = await c.post(f"{keystone}/auth/tokens", json=login)
    assert r.status_code == 201, r.text
    return r.headers["x-subject-token"]


def write_rows(rows: dict[str, list[dict[str, str]]]) -> None:
    tmp = ROWS.with_suffix(".tmp")
    # The rows go in before Horizon first starts (on a fresh machine its directory is not there).
    ROWS.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(rows))
    tmp.replace(ROWS)  # Horizon reads it whole or not at all


def horizon_log(lines: int = 60) -> str:
    try:
        return "\n".join((HORIZON_DIR / "server.log").read_text().splitlines()[-lines:])
    except OSError as exc:
        return f"(no Horizon log: {exc})"


async def goto(page: Page, url: str) -> None:
    """Horizon's own error page (its Keystone calls on a loaded CI machine) is retried, twice;
    a page that keeps failing fails the test with Horizon's log, which names the cause."""
    for attempt in range(3):
        answer = await page.goto(url, timeout=90_000)
        if answer is not None and answer.status < 500:
            return
        status = None if answer is None else answer.status
        print(f"Horizon answered {status} to {url} (attempt {attempt + 1}):\n{horizon_log()}")
        await asyncio.sleep(2)
    pytest.fail(f"Horizon answered {status} to {url} three times; its log:\n{horizon_log()}")


async def open_page(browser: Browser, horizon: str, tenant: Tenant) -> tuple[Page, list[str]]:
    page = await browser.new_page()
    await goto(page, f"{horizon}/auth/login/")
    await page.fill("#id_username", tenant.user)
    await page.fill("#id_password", tenant.password)
    async with page.expect_navigation(timeout=90_000):
        await page.click("#loginBtn")
    await goto(page, f"{horizon}/project/keel_demo/")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(f"{r.method} {r.url}"))
    try:
        await expect(page.locator("html")).to_have_attribute(
            "data-keel-live", "open", timeout=30_000
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nHorizon's log:\n{horizon_log()}") from exc
    return page, requests


async def settled(page: Page) -> None:
    """Until the refresh the stream does on opening has come back."""
    await page.wait_for_load_state("networkidle")


async def post_event(hub: httpx.AsyncClient, project: str, subject: str, state: str) -> None:
    event = {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "compute.host-a",
        "type": "compute.instance.update",
        "subject": subject,
        "tenant": project,
        "data": {"instance_id": subject, "state": state},
    }
    r = await hub.post("/v1/events", json=event)
    assert r.status_code == 202, r.text


def status(page: Page, row: str) -> Any:
    return page.locator(f'tr[data-object-id="{row}"] td:nth-child(2)')


# On a fresh machine the first start installs Keystone and Horizon from PyPI (about 4 min here).
@pytest.mark.timeout(900)
async def test_rows_follow_the_hubs_events_without_polling(
    browser: Browser, tmp_path: Path
) -> None:
    keystone = server_url("keystone")
    alice, bob = await make_tenant(keystone), await make_tenant(keystone)
    write_rows(
        {
            alice.project_id: [
                {"id": "inst-a1", "name": "a1", "status": "building"},
                {"id": "inst-a2", "name": "a2", "status": "active"},
            ],
            bob.project_id: [{"id": "inst-b1", "name": "b1", "status": "building"}],
        }
    )
    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    auth = KeystoneTokens(keystone, **ADMIN)
    hub = Hub(store, auth)
    await hub.start()
    try:
        async with (
            HubServer(hub, port=HUB_PORT) as server,
            httpx.AsyncClient(
                base_url=server.url, headers={"X-Auth-Token": await admin_token(keystone)}
            ) as admin,
        ):
            horizon = server_url("horizon")
            assert (await admin.get("/v1/subscriptions")).status_code == 200  # token cached
            a_page, a_requests = await open_page(browser, horizon, alice)
            b_page, b_requests = await open_page(browser, horizon, bob)
            await settled(a_page)
            await settled(b_page)
            await expect(status(a_page, "inst-a1")).to_have_text("building")

            # Waiting: longer than Horizon's poll interval, and nothing is asked for.
            a_requests.clear()
            b_requests.clear()
            await asyncio.sleep(4)
            assert a_requests == []
            assert b_requests == []

            # The cloud changes a1 (in transition) and a2 (changed outside Horizon).
            write_rows(
                {
                    alice.project_id: [
                        {"id": "inst-a1", "name": "a1", "status": "active"},
                        {"id": "inst-a2", "name": "a2", "status": "error"},
                    ],
                    bob.project_id: [{"id": "inst-b1", "name": "b1", "status": "building"}],
                }
            )
            started = time.monotonic()
            await post_event(admin, alice.project_id, "inst-a1", "active")
            await post_event(admin, alice.project_id, "inst-a2", "error")
            await expect(status(a_page, "inst-a1")).to_have_text("active", timeout=1000)
            await expect(status(a_page, "inst-a2")).to_have_text("error", timeout=1000)
            took = time.monotonic() - started
            assert took < 1.0, took
            updates = [r for r in a_requests if "action=row_update" in r]
            assert len(updates) == 2, a_requests  # one per changed row, no other request
            assert len(a_requests) == 2, a_requests

            # Another project's event naming Bob's row id never reaches Bob's page.
            await post_event(admin, alice.project_id, "inst-b1", "active")
            await asyncio.sleep(1.5)
            assert b_requests == []
            assert await b_page.evaluate("window.keelLive.events") == 0
            await expect(status(b_page, "inst-b1")).to_have_text("building")
            # Bob's own event does (the control: his stream is live).
            await post_event(admin, bob.project_id, "inst-b1", "building")
            await expect(b_page.locator("html")).to_have_attribute("data-keel-live", "open")
            await b_page.wait_for_function("window.keelLive.events === 1", timeout=2000)
            assert await a_page.evaluate("window.keelLive.events") == 3
    finally:
        await hub.stop()
        await auth.close()
        await store.close()
