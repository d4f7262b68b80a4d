"""TLS and credentials on every backend, against the real servers of scripts/servers.d/*-tls.sh
(client certificates required, password users; certificates from tests/tls_certs.py).

For each backend: the right CA, certificate and password work end to end; a wrong CA, an
expired client certificate, a client certificate from another CA and a wrong password are
each a typed error from ``connect`` saying which; no password ever reaches a log line, an
error message or a metric label.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import prometheus_client
import pytest
from typer.testing import CliRunner

from keel import errors, urls
from keel.cli import app
from keel.hub._serve import store_from_url
from tests import tls_certs
from tests.servers import server_url
from tests.topology.tls_checks import call_over, lock_over

pytestmark = [pytest.mark.timeout(120)]

PASSWORD = "keel-tls-pw"  # the servers' (scripts/servers.d/*-tls.sh)
WRONG = "wr0ng-pa55-5ecret"


async def _store(url: str) -> None:
    store = store_from_url(url)
    await store.open()
    await store.close()


# backend -> (server in scripts/servers.d, how to use it once)
BACKENDS: dict[str, tuple[str, Callable[[str], Awaitable[object]]]] = {
    "rabbitmq": ("rabbitmq-tls", call_over),
    "nats": ("nats-tls", call_over),
    "redis-transport": ("redis-tls", call_over),
    "redis-coordination": ("redis-tls", lock_over),
    "etcd": ("etcd-tls", lock_over),
    "zookeeper": ("zookeeper-tls", lock_over),
    "postgres": ("postgres-tls", _store),
}


@pytest.fixture(scope="session")
def certs() -> Path:
    return tls_certs.make(Path(urls.from_env("servers_dir", "/tmp/keel-servers")) / "tls")


@pytest.fixture(params=sorted(BACKENDS))
def backend(
    request: pytest.FixtureRequest, certs: Path
) -> tuple[str, Callable[[str], Awaitable[object]]]:
    server, use = BACKENDS[request.param]
    return server_url(server), use


def _swap(url: str, old: str, new: str) -> str:
    assert old in url, (old, url)
    return url.replace(old, new)


def _client_files(url: str, prefix: str) -> str:
    """The URL with another client certificate and key (libpq's names or Keel's)."""
    return url.replace("/client.pem", f"/{prefix}client.pem").replace(
        "/client.key", f"/{prefix}client.key"
    )


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text
        assert WRONG not in text


async def test_connects_with_the_right_ca_certificate_and_password(
    backend: tuple[str, Callable[[str], Awaitable[object]]], caplog: pytest.LogCaptureFixture
) -> None:
    url, use = backend
    caplog.set_level(logging.DEBUG)
    await use(url)
    _no_secret(caplog.text)


async def test_a_wrong_ca_says_so(backend: tuple[str, Callable[[str], Awaitable[object]]]) -> None:
    url, use = backend
    with pytest.raises(errors.TLSError) as info:
        await asyncio.wait_for(use(_swap(url, "/ca.pem", "/other-ca.pem")), 30)
    assert info.value.reason == "unknown-ca"
    assert "not signed by a CA in ca=" in str(info.value)
    _no_secret(str(info.value))


async def test_an_expired_client_certificate_says_so(
    backend: tuple[str, Callable[[str], Awaitable[object]]],
) -> None:
    url, use = backend
    with pytest.raises(errors.TLSError) as info:
        await asyncio.wait_for(use(_client_files(url, "expired-")), 30)
    assert info.value.reason == "client-cert-expired"
    assert "expired" in str(info.value)
    _no_secret(str(info.value))


async def test_a_client_certificate_of_another_ca_is_refused_by_the_server(
    backend: tuple[str, Callable[[str], Awaitable[object]]],
) -> None:
    url, use = backend
    with pytest.raises(errors.TLSError) as info:
        await asyncio.wait_for(use(_client_files(url, "other-")), 30)
    assert info.value.reason == "client-cert-rejected"
    _no_secret(str(info.value))


async def test_a_wrong_password_says_so_and_shows_no_secret(
    backend: tuple[str, Callable[[str], Awaitable[object]]], caplog: pytest.LogCaptureFixture
) -> None:
    url, use = backend
    await use(url)  # ZooKeeper: the right user creates /keel with its ACL first
    caplog.set_level(logging.DEBUG)
    with pytest.raises(errors.CredentialsRejected) as info:
        await asyncio.wait_for(use(_swap(url, f":{PASSWORD}@", f":{WRONG}@")), 30)
    assert info.value.user == "keel"
    assert "check the user name and password" in str(info.value)
    metrics = prometheus_client.generate_latest().decode()
    _no_secret(str(info.value), repr(info.value), caplog.text, metrics)


async def test_hub_serve_serves_https(tmp_path: Path, certs: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok": {"user": "u", "project": "p", "roles": ["member"]}}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keel",
        "hub",
        "serve",
        "--store",
        f"sqlite:///{tmp_path}/hub.db",
        "--tokens",
        str(tokens),
        "--port",
        "0",
        "--tls-cert",
        str(certs / "server.pem"),
        "--tls-key",
        str(certs / "server.key"),
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            while b"event=hub.serving" not in (line := await proc.stderr.readline()):
                assert line, "keel hub serve exited"
        found = re.search(r"url=(https://\S+)", line.decode())
        assert found is not None, line
        async with httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=certs / "ca.pem")
        ) as client:
            reply = await client.get(
                found.group(1) + "/v1/subscriptions", headers={"X-Auth-Token": "tok"}
            )
            assert reply.status_code == 200, reply.text
        async with httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=certs / "other-ca.pem")
        ) as stranger:
            with pytest.raises(httpx.ConnectError):
                await stranger.get(found.group(1) + "/healthz")
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--tls-cert", "CERT"], "give both --tls-cert FILE and --tls-key FILE"),
        (["--tls-cert", "CA", "--tls-key", "KEY"], "cannot load them"),
    ],
)
def test_hub_serve_refuses_bad_tls_options(
    tmp_path: Path, certs: Path, args: list[str], says: str
) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text("{}")
    files = {"CERT": certs / "server.pem", "CA": certs / "ca.pem", "KEY": certs / "server.key"}
    argv = [str(files.get(a, a)) for a in args]
    result = CliRunner().invoke(
        app,
        ["hub", "serve", "--store", f"sqlite:///{tmp_path}/hub.db", "--tokens", str(tokens), *argv],
    )
    assert result.exit_code == 2
    assert says in result.output
