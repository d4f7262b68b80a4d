"""The dashboard in headless Chromium (Debian's, driven by Playwright): events published on the
bus appear on a tenant's page through SSE, never on another tenant's, and the page polls
nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from keel.hub import Hub, HubServer, listener
from keel.messaging import Notifier, RequestContext, connect

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        yield b
        await b.close()


async def open_dashboard(browser: Browser, url: str, token: str) -> tuple[Page, list[str]]:
    page = await browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(f"{r.method} {r.url}"))
    await page.goto(f"{url}/#token={token}")
    await expect(page.locator("#status")).to_have_text("live", timeout=10_000)
    return page, requests


async def test_events_reach_their_tenant_page_only_and_nothing_polls(
    hub: Hub, server: HubServer, browser: Browser
) -> None:
    transport = await connect(f"memory://dash-{uuid.uuid4().hex[:6]}")
    lis = listener(hub, transport)
    await lis.start()
    try:
        alice, alice_requests = await open_dashboard(browser, server.url, "tok-alice")
        bob, bob_requests = await open_dashboard(browser, server.url, "tok-bob")
        settled = (len(alice_requests), len(bob_requests))
        compute = Notifier(transport, "compute.host-a")
        one, two = RequestContext(project="p-one"), RequestContext(project="p-two")
        for ctx, inst in ((one, "inst-a1"), (two, "inst-b1")):
            payload = {"instance_id": inst, "display_name": inst, "state": "building"}
            await compute.info(ctx, "compute.instance.create.start", payload)
            await compute.info(ctx, "compute.instance.create.end", {**payload, "state": "active"})
        await compute.info(
            one, "compute.instance.power_off.end", {"instance_id": "inst-a1", "state": "stopped"}
        )
        a_row = alice.locator('tr[data-instance="inst-a1"] td.state')
        await expect(a_row).to_have_text("stopped", timeout=10_000)
        await expect(bob.locator('tr[data-instance="inst-b1"] td.state')).to_have_text(
            "active", timeout=10_000
        )
        await expect(alice.locator("#log")).to_contain_text("compute.instance.power_off.end")
        await asyncio.sleep(0.5)  # give a leak every chance to show
        assert await bob.locator('tr[data-instance="inst-a1"]').count() == 0
        assert "inst-a1" not in await bob.locator("body").inner_text()
        assert "inst-b1" not in await alice.locator("body").inner_text()
        # No request after the page went live: updates came over the one EventSource.
        assert (len(alice_requests), len(bob_requests)) == settled
        streams = [r for r in alice_requests if "/stream" in r]
        assert len(streams) == 1
    finally:
        await lis.stop()
        await transport.close()
