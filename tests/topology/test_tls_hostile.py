"""TLS and credentials attacked from outside, on every backend, against the real TLS servers of
scripts/servers.d/*-tls.sh:

* a server certificate that has expired, that is not valid yet, or that names another host
  (presented by tests/topology/tls_proxy.py in front of the real server, signed by the CA the
  client trusts) is a `TLSError` saying which, from ``connect``, before any work is accepted;
  the same proxy with a good certificate carries the work through, so a client that skipped a
  check would be caught doing its work;
* a multi-host URL whose first endpoints are down, or whose endpoints have certificates of
  their own names, reaches the one that answers (ZooKeeper checks every host's name, not only
  the first one's; etcd checks each member against its own name);
* no password shows in any log record at any level (kazoo's BLATHER, level 5, included), in
  an error or in a metric, whether the login succeeds or fails.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import prometheus_client
import pytest

from keel import errors, urls
from tests import tls_certs
from tests.servers import server_url
from tests.topology.test_tls import BACKENDS, PASSWORD, WRONG
from tests.topology.tls_proxy import TLSProxy

pytestmark = [pytest.mark.timeout(120)]

Use = Callable[[str], Awaitable[None]]


@pytest.fixture(scope="session")
def certs() -> Path:
    return tls_certs.make(Path(urls.from_env("servers_dir", "/tmp/keel-servers")) / "tls")


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, certs: Path) -> tuple[str, Use]:
    server, use = BACKENDS[request.param]
    return server_url(server), use


def _port(url: str) -> int:
    return urls.parse(url).hosts[0].port or 0


def _via(url: str, port: int, host: str = "localhost") -> str:
    """The URL with its endpoint moved to ``host:port``."""
    old = urls.parse(url).hosts[0]
    return url.replace(f"@{old.host}:{old.port}", f"@{host}:{port}", 1)


@pytest.fixture
def proxy(certs: Path) -> Iterator[Callable[[str, int], TLSProxy]]:
    opened: list[TLSProxy] = []

    def start(kind: str, upstream: int) -> TLSProxy:
        opened.append(TLSProxy(kind, upstream, certs))
        return opened[-1]

    yield start
    for each in opened:
        each.close()


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_good_certificate_through_the_proxy_carries_the_work(
    backend: tuple[str, Use], proxy: Callable[[str, int], TLSProxy]
) -> None:
    url, use = backend
    front = proxy("ip", _port(url))  # a certificate for 127.0.0.1 only, reached so
    await asyncio.wait_for(use(_via(url, front.port, "127.0.0.1")), 60)
    assert front.handshakes >= 1


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("expired", "expired"), ("not-yet-valid", "not-yet-valid"), ("other-host", "hostname")],
)
async def test_a_bad_server_certificate_is_refused_before_any_work(
    backend: tuple[str, Use], proxy: Callable[[str, int], TLSProxy], kind: str, reason: str
) -> None:
    url, use = backend
    front = proxy(kind, _port(url))
    with pytest.raises(errors.TLSError) as info:
        await asyncio.wait_for(use(_via(url, front.port)), 30)
    assert info.value.reason == reason, info.value
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize("name", sorted(n for n in BACKENDS if not n.startswith("redis")))
async def test_a_multi_host_url_reaches_a_later_host_checked_against_its_own_name(
    name: str, certs: Path, proxy: Callable[[str, int], TLSProxy]
) -> None:
    """localhost (down) first, then 127.0.0.1 behind a certificate for 127.0.0.1 only: the
    client must move on to the second host and check its certificate against "127.0.0.1",
    not against the first host's name. (A Redis URL names one server, or sentinels:
    tests/topology/test_sentinel_hosts.py.)"""
    server, use = BACKENDS[name]
    url = server_url(server)
    front = proxy("ip", _port(url))
    old = urls.parse(url).hosts[0]
    two = url.replace(
        f"@{old.host}:{old.port}", f"@localhost:{_dead_port()},127.0.0.1:{front.port}", 1
    )
    if name == "nats":  # two URLs, one server: not a cluster that holds 3 stream replicas
        two += "&replicas=1"
    await asyncio.wait_for(use(two), 60)
    assert front.handshakes >= 1


async def test_no_password_in_any_log_record_at_any_level(
    backend: tuple[str, Use], caplog: pytest.LogCaptureFixture
) -> None:
    url, use = backend
    caplog.set_level(1)  # everything: kazoo logs its requests at BLATHER (5)
    for logger in ("kazoo", "kazoo.client", "aiormq", "nats", "asyncpg", "grpc", "redis"):
        logging.getLogger(logger).setLevel(1)
    try:
        await asyncio.wait_for(use(url), 60)
        with pytest.raises(errors.CredentialsRejected) as info:
            await asyncio.wait_for(use(url.replace(f":{PASSWORD}@", f":{WRONG}@")), 30)
    finally:
        for logger in ("kazoo", "kazoo.client", "aiormq", "nats", "asyncpg", "grpc", "redis"):
            logging.getLogger(logger).setLevel(logging.NOTSET)
    texts = [r.getMessage() for r in caplog.records] + [str(info.value), repr(info.value)]
    texts.append(prometheus_client.generate_latest().decode())
    for text in texts:
        for secret in (PASSWORD, WRONG):
            assert secret not in text, text
            assert re.sub("-", "", secret) not in text.replace("-", ""), text


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("/client.", "/other-client.", "client-cert-rejected"),
        ("/ca.pem", "/other-ca.pem", "unknown-ca"),
    ],
)
async def test_postgres_says_which_tls_refusal_asyncpg_saw_as_a_closed_connection(
    old: str, new: str, reason: str
) -> None:
    """Under TLS 1.3 PostgreSQL refuses a client certificate after the handshake, while
    asyncpg already writes: the server's reset may beat its alert, and asyncpg says only
    "connection was closed in the middle of operation" (once reported so, as
    BackendUnavailable). That error, on a real refusal, is the `TLSError` that says why:
    the probe reads before it writes."""
    import asyncpg  # noqa: PLC0415

    from keel.hub.stores._pg_connect import hidden_refusal  # noqa: PLC0415

    url = server_url("postgres-tls")
    closed = asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
    found = await hidden_refusal(closed, url.replace(old, new))
    assert isinstance(found, errors.TLSError)
    assert found.reason == reason
    assert await hidden_refusal(closed, url) is None  # the right certificate: not a TLS refusal
