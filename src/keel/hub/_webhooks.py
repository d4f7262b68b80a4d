"""Webhooks: push a subscription's queue to a URL, signed as Standard Webhooks says.

Content: CloudEvents' HTTP binding. By default structured mode: the event in the JSON format
as the body, ``Content-Type: application/cloudevents+json``. With the subscription's
``webhook.mode`` ``"binary"``: every attribute but the data as a ``ce-<name>`` header
(percent-encoded as the binding says), ``Content-Type`` from ``datacontenttype``, and the
data itself as the body (``data_base64`` decoded). A face's subscription (``webhook.render``,
the Zaqar API's) gets the face's own body instead, as ``application/json``: it is not an
event, so no content mode and no ``ce-*`` header applies to it.

Signing: ``webhook-id`` (stable across retries of one message), ``webhook-timestamp`` (Unix
seconds of the attempt) and ``webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">`` keyed by the subscription's ``whsec_`` secret.

Delivery: in order, one message at a time per subscription, at least once. A webhook is a
consumer of the subscription's queue through head-only claims, so its retry state (delivery
count, next attempt time) lives in the store and survives a hub restart: after a failed
attempt the claim is extended to the next backoff time; after ``max_deliveries`` failed
attempts the message goes to the dead letters and the next one is tried. A receiver that
answered 2xx after the claim expired may get the message again (at least once; the
``webhook-id`` lets it deduplicate).

Targets: a webhook's host is resolved once per connection, every address it resolves to is
checked (loopback, link-local, private, multicast, reserved, unspecified, and IPv4-mapped
IPv6 forms of those are refused unless the operator allows private targets), and the
connection goes to the checked address only: the transport's network backend does all
three, so no second lookup can rebind the name between check and connect. The URL keeps the
host name, so the Host header, TLS SNI and certificate verification use the name. Redirects
are not followed (a 3xx is a failed attempt). Proxies from the environment are ignored (a
proxy would connect elsewhere). A refused address is a failed attempt, retried on the
schedule like an unreachable host, then dead-lettered.

At creation only the URL's form is checked (`WEBHOOK_URL`, which the OpenAPI document
states): whether a name resolves, and to what, is known only when connecting, and the
answer may change at any time; so the hub never looks a name up at creation (which would
also let any tenant make it resolve names of its choosing inside a request).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from urllib.parse import quote, urlsplit

import httpcore
import httpx
import msgspec

from keel._log import event as log_event
from keel.errors import KeelError, UnsafeWebhookTarget
from keel.hub.stores.base import Message, Store, Subscription

log = logging.getLogger("keel.hub.webhooks")

DEFAULT_BACKOFF = (5.0, 30.0, 120.0, 600.0, 1800.0, 7200.0)


STRUCTURED = "application/cloudevents+json"
# The HTTP binding's header value encoding: printable ASCII but space, '"' and '%' as is.
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


def binary_mode(event: bytes) -> tuple[dict[str, str], bytes]:
    """Headers and body of a stored event in the HTTP binding's binary content mode."""
    attributes = msgspec.json.decode(event)
    data = attributes.pop("data", None)
    b64 = attributes.pop("data_base64", None)
    ctype = attributes.pop("datacontenttype", None)
    headers = {}
    for name, value in attributes.items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        headers[f"ce-{name}"] = quote(text, safe=_HEADER_SAFE)
    if b64 is not None:
        body = base64.b64decode(b64)
    elif data is None:
        body = b""
    elif isinstance(data, str) and not _is_json(ctype):
        body = data.encode()
    else:
        body = msgspec.json.encode(data)
    if ctype is not None or body:
        headers["content-type"] = ctype or "application/json"
    return headers, body


def _is_json(ctype: str | None) -> bool:
    media = (ctype or "application/json").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json") or media == "text/json"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, *, tolerance: float = 300) -> bool:
    """What a receiver does (used by tests; a receiver may use any Standard Webhooks library)."""
    try:
        msg_id, ts = headers["webhook-id"], int(headers["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - ts) > tolerance:
        return False
    want = sign(secret, msg_id, ts, body)
    return any(hmac.compare_digest(want, s) for s in headers.get("webhook-signature", "").split())


def _ipv6() -> str:
    """RFC 3986's IPv6address, as a regular expression (no zone id)."""
    h16, dec = "[0-9A-Fa-f]{1,4}", "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
    ls32 = f"(?:{h16}:{h16}|{dec}(?:[.]{dec}){{3}})"
    forms = [f"(?:{h16}:){{6}}{ls32}", f"::(?:{h16}:){{5}}{ls32}"]
    for before, after in [(0, 4), (1, 3), (2, 2), (3, 1)]:
        forms.append(f"(?:(?:{h16}:){{0,{before}}}{h16})?::(?:{h16}:){{{after}}}{ls32}")
    forms += [
        f"(?:(?:{h16}:){{0,4}}{h16})?::{ls32}",
        f"(?:(?:{h16}:){{0,5}}{h16})?::{h16}",
        f"(?:(?:{h16}:){{0,6}}{h16})?::",
    ]
    return "|".join(forms)


_DEC_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_PORT = "(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
# What a webhook URL may be, exactly (the OpenAPI document carries the same pattern): http or
# https; a host that is a DNS name (its last label starts with a letter, so no name is read
# as an IPv4 address), a dotted IPv4 address or a bracketed IPv6 address; an optional port
# 1-65535; then a path, query or fragment in printable ASCII (percent-encode the rest). No
# credentials, no whitespace. Up to `MAX_URL` characters.
WEBHOOK_URL = (
    "^[Hh][Tt][Tt][Pp][Ss]?://"
    "(?:(?:[A-Za-z0-9_-]{1,63}[.])*[A-Za-z][A-Za-z0-9_-]{0,62}[.]?"
    f"|{_DEC_OCTET}(?:[.]{_DEC_OCTET}){{3}}"
    f"|\\[(?:{_ipv6()})\\])"
    f"(?::{_PORT})?"
    "(?:[/?#][\\x21-\\x7e]*)?$"
)
MAX_URL = 2048
_WEBHOOK_URL = re.compile(WEBHOOK_URL)


def check_url(url: str) -> tuple[str, int]:
    """Host and port of a webhook URL of the form `WEBHOOK_URL` says; `UnsafeWebhookTarget`
    for anything else. Syntax only: which addresses the host may reach is decided on every
    connection (`resolve_target`), where the answer is the one the connection will use."""
    if len(url) > MAX_URL:
        raise UnsafeWebhookTarget(
            f"webhook url is longer than {MAX_URL} characters", field="webhook", limit=MAX_URL
        )
    if not _WEBHOOK_URL.fullmatch(url):
        raise UnsafeWebhookTarget(
            "webhook url must be http:// or https://, a host name or IP address, an optional "
            "port 1-65535 and a path in printable ASCII, without credentials",
            field="webhook",
        )
    parts = urlsplit(url)
    assert parts.hostname is not None  # the pattern requires one
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


# host, port -> the addresses it resolves to (tests inject their own to play DNS rebinding).
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
# A face's request body (and extra headers) for a message; see `Webhook.render`.
Renderer = Callable[[Subscription, Message], tuple[bytes, dict[str, str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is no public webhook target, or None if it is one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "not global"


async def resolve_target(
    host: str, port: int, *, allow_private: bool, resolver: Resolver = system_resolver
) -> str:
    """The one address to connect to for ``host``: every address it resolves to passes the
    policy, else `UnsafeWebhookTarget`."""
    try:
        addresses: Iterable[str] = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = await resolver(host, port)
        except OSError as exc:
            raise UnsafeWebhookTarget(f"webhook host {host!r} does not resolve: {exc}") from None
    try:
        checked = [ipaddress.ip_address(a) for a in addresses]
    except ValueError as exc:
        raise UnsafeWebhookTarget(f"webhook host {host!r} resolves to {exc}") from None
    if not checked:
        raise UnsafeWebhookTarget(f"webhook host {host!r} resolves to no address")
    for address in checked if not allow_private else ():
        why = refusal(address)
        if why is not None:
            raise UnsafeWebhookTarget(
                f"webhook host {host!r} resolves to {address} ({why}), which is not a public "
                "address (loopback, link-local, private and other non-public ranges are "
                "refused unless the operator allows them)"
            )
    return str(checked[0])


async def check_target(
    url: str, *, allow_private: bool, resolver: Resolver = system_resolver
) -> None:
    host, port = check_url(url)
    if not allow_private:
        await resolve_target(host, port, allow_private=False, resolver=resolver)


def check_form(url: str, *, allow_private: bool) -> None:
    """`check_url`, and a non-public IP address literal refused at once (unless allowed):
    that answer needs no lookup and cannot change. Names are not looked up (see above)."""
    host, _ = check_url(url)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return  # a name: checked when connecting
    why = None if allow_private else refusal(address)
    if why is not None:
        raise UnsafeWebhookTarget(
            f"webhook address {address} is {why}, not a public address (non-public ranges "
            "are refused unless the operator allows them)",
            field="webhook",
        )


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks and connects in one step, to the address it checked."""

    def __init__(self, resolver: Resolver, allow_private: bool) -> None:
        self.resolver = resolver
        self.allow_private = allow_private
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        address = await resolve_target(
            host, port, allow_private=self.allow_private, resolver=self.resolver
        )
        return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise UnsafeWebhookTarget("webhooks do not go to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def pinned_client(
    *,
    timeout: float,
    allow_private: bool,
    resolver: Resolver = system_resolver,
    verify: ssl.SSLContext | bool = True,
) -> httpx.AsyncClient:
    """An httpx client whose every connection goes through `resolve_target`."""
    transport = httpx.AsyncHTTPTransport(verify=verify, trust_env=False)
    # httpx takes no network backend; its pool is swapped for one built the same way with
    # ours (tests/hub/test_webhooks.py proves a rebinding name never gets a connection).
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
        network_backend=_PinnedBackend(resolver, allow_private),
    )
    return httpx.AsyncClient(
        transport=transport, timeout=timeout, follow_redirects=False, trust_env=False
    )


class Dispatcher:
    """One delivery task per webhook subscription, woken by new messages."""

    def __init__(
        self,
        store: Store,
        *,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        timeout: float = 10.0,
        allow_private: bool = False,
        idle_check: float = 0.5,
        resolver: Resolver = system_resolver,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.store = store
        self.resolver = resolver
        self.verify = verify
        self.backoff = tuple(backoff)
        self.timeout = timeout
        self.allow_private = allow_private
        self.idle_check = idle_check
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wakes: dict[str, asyncio.Event] = {}
        self._client: httpx.AsyncClient | None = None
        self.attempts = 0
        # Bodies other than the stored event, by `Webhook.render` name (faces register them).
        self.renderers: dict[str, Renderer] = {}

    def add(self, sub: Subscription) -> None:
        if sub.webhook is None or sub.id in self._tasks:
            return
        if self._client is None:
            self._client = pinned_client(
                timeout=self.timeout,
                allow_private=self.allow_private,
                resolver=self.resolver,
                verify=self.verify,
            )
        self._wakes[sub.id] = asyncio.Event()
        self._tasks[sub.id] = asyncio.create_task(self._run(sub), name=f"webhook-{sub.id}")

    def remove(self, sub_id: str) -> None:
        task = self._tasks.pop(sub_id, None)
        self._wakes.pop(sub_id, None)
        if task is not None:
            task.cancel()

    def wake(self, sub_id: str) -> None:
        wake = self._wakes.get(sub_id)
        if wake is not None:
            wake.set()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def delay(self, deliveries: int) -> float:
        return self.backoff[min(deliveries, len(self.backoff)) - 1]

    async def _run(self, sub: Subscription) -> None:
        wake = self._wakes[sub.id]
        while True:
            try:
                delivered = await self._once(sub)
            except KeelError as exc:  # e.g. the claim expired during a slow attempt
                log_event(log, logging.WARNING, "webhook.store_error", sub=sub.id, error=exc)
                delivered = False
            except Exception as exc:
                # A fault of the hub's, not the receiver's: logged, and this subscription's
                # deliveries go on (a dead task would stop them until the next restart).
                log_event(log, logging.ERROR, "webhook.fault", sub=sub.id, error=repr(exc))
                delivered = False
            if not delivered:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.idle_check)

    async def _once(self, sub: Subscription) -> bool:
        """Try the head message once; False when there was nothing to try."""
        claim = await self.store.claim(
            sub.id,
            limit=1,
            ttl=self.timeout + 1,
            now=time.time(),
            max_deliveries=sub.max_deliveries,
            head_only=True,
        )
        if claim is None:
            return False
        message = claim.messages[0]
        if await self._post(sub, message):
            await self.store.ack(sub.id, claim.id, None, now=time.time())
        elif message.deliveries >= sub.max_deliveries:
            # The next claim moves it to the dead letters and goes on with the next message.
            await self.store.release(sub.id, claim.id, now=time.time())
        else:
            await self.store.extend(
                sub.id, claim.id, ttl=self.delay(message.deliveries), now=time.time()
            )
            return False
        return True

    async def _post(self, sub: Subscription, message: Message) -> bool:
        assert sub.webhook is not None
        assert self._client is not None
        self.attempts += 1
        if sub.webhook.render is not None:
            # A face's own body (Zaqar's), not a CloudEvent: no content mode applies to it.
            render = self.renderers.get(sub.webhook.render)
            if render is None:  # that face is not served here: never send another shape
                log_event(log, logging.WARNING, "webhook.no_renderer", sub=sub.id)
                return False
            body, extra = render(sub, message)
            headers = {**extra, "content-type": "application/json"}
        elif sub.webhook.mode == "binary":
            headers, body = binary_mode(bytes(message.event))
        else:
            headers, body = {"content-type": STRUCTURED}, bytes(message.event)
        msg_id = f"msg_{sub.id}_{message.seq}"
        ts = int(time.time())
        headers["webhook-id"] = msg_id
        headers["webhook-timestamp"] = str(ts)
        headers["webhook-signature"] = sign(sub.webhook.secret, msg_id, ts, body)
        try:
            response = await self._client.post(sub.webhook.url, content=body, headers=headers)
        except UnsafeWebhookTarget as exc:
            log_event(log, logging.WARNING, "webhook.refused_target", sub=sub.id, error=exc)
            return False
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            log_event(log, logging.INFO, "webhook.failed", sub=sub.id, seq=message.seq, error=exc)
            return False
        ok = 200 <= response.status_code < 300
        if not ok:
            log_event(
                log,
                logging.INFO,
                "webhook.refused",
                sub=sub.id,
                seq=message.seq,
                status=response.status_code,
            )
        return ok
