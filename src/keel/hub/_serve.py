"""`keel hub serve`: the hub for operators, on a real store, fed by Keel and OpenStack buses.

Everything is checked before anything is started: a bad store URL, token file or Keystone
option, transport URL or oslo option is a `ConfigError` naming the option and the fix. Then
the store opens, the hub starts, the listeners start (one Keel listener on ``transport``; one
oslo listener per exchange on the ``oslo`` broker), the HTTP server binds, and one
``event=hub.serving`` line says where. SIGINT or SIGTERM stops in the reverse order:
listeners first (what they committed is acked, the rest stays on the bus), then HTTP, hub,
store, transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from keel import urls
from keel._log import event
from keel.errors import ConfigError
from keel.hub._auth import Authenticator, KeystoneTokens, StaticTokens
from keel.hub._core import Hub
from keel.hub._ingest import listener
from keel.hub._map_feed import MapFeed
from keel.hub._oslo_ingest import OSLO_TOPICS, oslo_listener, oslo_url
from keel.hub._server import HubServer
from keel.hub.stores.base import Store
from keel.hub.zaqar import ZaqarConfig
from keel.messaging import NotificationListener, Target, connect

log = logging.getLogger("keel.hub")

__all__ = ["OSLO_TOPICS", "ServeOptions", "check", "run_until_signalled", "serve"]


@dataclass
class ServeOptions:
    store: str
    tokens: Path | None = None
    keystone: str | None = None
    keystone_user: str = "keel-hub"
    keystone_project: str = "service"
    map_db: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8780
    transport: str | None = None
    topics: Sequence[str] = ("notifications",)
    oslo: str | None = None
    oslo_topics: Sequence[str] = OSLO_TOPICS
    oslo_exchanges: Sequence[str] = ("openstack",)
    oslo_durable: bool = False
    pool: str = "keel-hub"
    zaqar_key: Path | None = None  # the Zaqar API's signed-URL secret (shared by every hub)
    zaqar_confirm: bool = False  # Zaqar subscribers must confirm before deliveries
    tls_cert: Path | None = None
    tls_key: Path | None = None


def store_from_url(url: str) -> Store:
    """``sqlite:///path/hub.db`` (``sqlite://hub.db`` is relative) or ``postgresql://...``."""
    cls, parsed = urls.resolve("store", url)
    target = url
    if parsed.scheme == "sqlite":
        target = url.split("://", 1)[1].split("?", 1)[0]
        if not target or target.endswith("/"):
            raise ConfigError(
                f"--store {url}: name the database file, e.g. sqlite:///var/lib/keel/hub.db"
            )
        if not Path(target).parent.is_dir():
            raise ConfigError(f"--store {url}: directory {Path(target).parent} does not exist")
    store: Store = cls(target)
    return store


def authenticator(options: ServeOptions) -> Authenticator:
    """The static token file or Keystone, exactly one of them. Keystone's service password
    comes from ``KEEL_KEYSTONE_PASSWORD``, never from the command line (where `ps` shows it)."""
    if (options.tokens is None) == (options.keystone is None):
        raise ConfigError("give exactly one of --tokens FILE and --keystone URL")
    if options.tokens is not None:
        return StaticTokens.from_file(options.tokens)
    assert options.keystone is not None
    parsed = urls.parse(options.keystone)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(
            f"--keystone {options.keystone}: expected Keystone's v3 URL, "
            "e.g. https://keystone.example:5000/v3"
        )
    password = os.environ.get("KEEL_KEYSTONE_PASSWORD", "")
    if not password:
        raise ConfigError(
            "--keystone needs the service user's password in KEEL_KEYSTONE_PASSWORD "
            f"(user {options.keystone_user}, project {options.keystone_project})"
        )
    return KeystoneTokens(
        options.keystone,
        username=options.keystone_user,
        password=password,
        project=options.keystone_project,
    )


def check(options: ServeOptions) -> tuple[Store, Authenticator, list[str]]:
    """Validate every option (nothing is connected yet); `ConfigError` names the bad one."""
    auth = authenticator(options)
    if options.map_db is not None and not options.map_db.parent.is_dir():
        raise ConfigError(f"--map-db {options.map_db}: directory does not exist")
    for topic in [*options.topics, *options.oslo_topics]:
        Target(topic)  # validates the name
    Target(options.pool)
    if options.transport is not None:
        urls.resolve("transport", options.transport)
    oslo_urls: list[str] = []
    if options.oslo is not None:
        if not options.oslo_exchanges:
            raise ConfigError("--oslo needs at least one --oslo-exchange")
        if not options.oslo_topics:
            raise ConfigError("--oslo needs at least one --oslo-topic")
        oslo_urls = [
            oslo_url(options.oslo, exchange, durable=options.oslo_durable)
            for exchange in options.oslo_exchanges
        ]
    zaqar_config(options)
    if not 0 <= options.port <= 65535:
        raise ConfigError(f"--port {options.port} is not a TCP port (0..65535)")
    check_tls(options)
    return store_from_url(options.store), auth, oslo_urls


def zaqar_config(options: ServeOptions) -> ZaqarConfig:
    if options.zaqar_key is None:
        return ZaqarConfig(require_confirmation=options.zaqar_confirm)
    try:
        key = options.zaqar_key.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"--zaqar-key {options.zaqar_key}: {exc}") from None
    if len(key) < 16:
        raise ConfigError(f"--zaqar-key {options.zaqar_key}: the key needs 16 bytes or more")
    return ZaqarConfig(secret_key=key, require_confirmation=options.zaqar_confirm)


def check_tls(options: ServeOptions) -> None:
    """--tls-cert and --tls-key together, and loadable as a server certificate and its key."""
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ConfigError("give both --tls-cert FILE and --tls-key FILE, or neither")
    if options.tls_cert is None or options.tls_key is None:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(options.tls_cert, options.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"--tls-cert {options.tls_cert} --tls-key {options.tls_key}: cannot load them "
            f"as a PEM certificate chain and its key ({type(exc).__name__}: {exc.strerror or exc})"
        ) from None


async def serve(options: ServeOptions, stop: asyncio.Event) -> None:
    store, auth, oslo_urls = check(options)
    async with contextlib.AsyncExitStack() as stack:
        await store.open()
        stack.push_async_callback(store.close)
        hub = Hub(store, auth)
        await hub.start()
        stack.push_async_callback(hub.stop)
        feed = None
        if options.map_db is not None:
            feed = MapFeed(options.map_db)
            await feed.start()
        server = HubServer(
            hub,
            options.host,
            options.port,
            map_feed=feed,
            zaqar=zaqar_config(options),
            tls_cert=str(options.tls_cert) if options.tls_cert else None,
            tls_key=str(options.tls_key) if options.tls_key else None,
        )
        await server.start()
        stack.push_async_callback(server.stop)
        listeners: list[NotificationListener] = []
        if options.transport is not None:
            transport = await connect(options.transport)
            stack.push_async_callback(transport.close)
            listeners.append(listener(hub, transport, topics=options.topics, pool=options.pool))
        for exchange, url in zip(options.oslo_exchanges, oslo_urls, strict=False):
            transport = await connect(url)
            stack.push_async_callback(transport.close)
            # One queue per exchange: a queue name is global on the broker, the exchange not.
            pool = options.pool if len(oslo_urls) == 1 else f"{options.pool}-{exchange}"
            listeners.append(
                oslo_listener(
                    hub,
                    transport,
                    topics=options.oslo_topics,
                    pool=pool,
                    durable=options.oslo_durable,
                )
            )
        for lis in listeners:
            await lis.start()
            stack.push_async_callback(lis.stop, 10)
        event(
            log,
            logging.INFO,
            "hub.serving",
            url=server.url,
            store=urls.parse(options.store).redacted(),
            auth="keystone" if options.keystone else "tokens",
            map_db=options.map_db,
            transport=urls.parse(options.transport).redacted() if options.transport else None,
            topics=",".join(options.topics) if options.transport else None,
            oslo=urls.parse(options.oslo).redacted() if options.oslo else None,
            oslo_exchanges=",".join(options.oslo_exchanges) if options.oslo else None,
            oslo_topics=",".join(options.oslo_topics) if options.oslo else None,
            pool=options.pool,
        )
        await stop.wait()
        event(log, logging.INFO, "hub.stopping")
    event(log, logging.INFO, "hub.stopped", ingested=hub.ingested)


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)``; the first SIGINT/SIGTERM sets ``stop``, a second exits at once."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                # Second signal: stop at once, without the orderly shutdown.
                os._exit(130)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await main(stop)

    asyncio.run(run())
