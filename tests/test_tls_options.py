"""The shared TLS and URL plumbing (keel._tls, keel.urls): option names and precedence, when
TLS is on, bad files named, handshake failures classified, multi-host URLs parsed and
redacted. In-process only: the real servers are in tests/topology/test_tls.py."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from pathlib import Path

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from keel import _tls, errors, urls
from tests import tls_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tls_certs.make(tmp_path_factory.mktemp("certs"))


def test_tls_is_on_by_scheme_or_url_never_by_environment_alone(
    certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_TLS_CA", str(certs / "ca.pem"))
    assert _tls.tls_config(urls.parse("redis://h/0")) is None
    on = _tls.tls_config(urls.parse("rediss://h/0"), secure_scheme=True)
    assert on is not None
    assert on.ca == str(certs / "ca.pem")  # the environment fills what the URL leaves out
    assert _tls.tls_config(urls.parse(f"redis://h/0?ca={certs}/ca.pem")) is not None
    assert _tls.tls_config(urls.parse("redis://h/0?tls=true")) is not None
    with pytest.raises(errors.ConfigError, match="contradicts"):  # never quietly plaintext
        _tls.tls_config(urls.parse(f"redis://h/0?ca={certs}/ca.pem&tls=false"))


def test_keywords_beat_the_url_which_beats_the_environment(
    certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_TLS_VERIFY", "none")
    url = urls.parse(f"amqps://h/?ca={certs}/ca.pem&verify=ca")
    assert _tls.tls_config(url, secure_scheme=True).verify == "ca"  # type: ignore[union-attr]
    config = _tls.tls_config(url, {"verify": "full"}, secure_scheme=True)
    assert config is not None
    assert config.verify == "full"
    assert config.context().check_hostname


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("ca=/no/such/ca.pem", "ca=/no/such/ca.pem: no such readable file"),
        ("verify=maybe", "verify='maybe'"),
        ("cert={d}/client.pem&key={d}/server.key", "cannot load the client certificate"),
        ("key={d}/client.key", "key= needs cert="),
        ("ca={d}/client.key", "not a PEM CA file"),
    ],
)
def test_bad_options_are_config_errors_naming_the_option(
    certs: Path, query: str, says: str
) -> None:
    with pytest.raises(errors.ConfigError, match=None) as info:
        _tls.tls_config(urls.parse("amqps://h/?" + query.format(d=certs)), secure_scheme=True)
    assert says in str(info.value)


def test_an_expired_client_certificate_is_named_before_connecting(certs: Path) -> None:
    url = urls.parse(f"amqps://h/?cert={certs}/expired-client.pem&key={certs}/expired-client.key")
    with pytest.raises(errors.TLSError) as info:
        _tls.tls_config(url, secure_scheme=True)
    assert info.value.reason == "client-cert-expired"


async def _serve(cert: trustme.LeafCert) -> tuple[asyncio.Server, int]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    ("identity", "expired", "reason"),
    [("127.0.0.1", True, "expired"), ("elsewhere.example", False, "hostname")],
)
async def test_handshake_failures_are_classified(
    tmp_path: Path, identity: str, expired: bool, reason: str
) -> None:
    ca = trustme.CA()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    leaf = ca.issue_cert(
        identity,
        not_before=past - datetime.timedelta(days=2) if expired else None,
        not_after=past if expired else None,
    )
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server, port = await _serve(leaf)
    try:
        config = _tls.TLSConfig(ca=str(tmp_path / "ca.pem"))
        assert await asyncio.to_thread(_tls.diagnose, "127.0.0.1", port, config) == reason
        failure = _tls.tls_error(reason, backend="X", server="x://127.0.0.1")
        assert failure.reason == reason
    finally:
        server.close()
        await server.wait_closed()


def test_multi_host_urls_keep_every_endpoint_and_hide_every_password() -> None:
    url = urls.parse("rabbit://u:p1@h1:5672,v:p2@h2:5673,h3/vh?heartbeat=5&sentinel_password=s3")
    assert [(h.host, h.port, h.username, h.password) for h in url.hosts] == [
        ("h1", 5672, "u", "p1"),
        ("h2", 5673, "v", "p2"),
        ("h3", None, "u", "p1"),  # no credentials of its own: the first endpoint's
    ]
    assert url.endpoints(5672) == ["h1:5672", "h2:5673", "h3:5672"]
    redacted = url.redacted()
    for secret in ("p1", "p2", "s3"):
        assert secret not in redacted
    assert url.path == "/vh"
    assert urls.parse("etcd://[::1]:2379,127.0.0.1").endpoints(2379) == [
        "[::1]:2379",
        "127.0.0.1:2379",
    ]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("nats://h1:4222,,h2:4222", "empty host"),
        ("nats://h1:４２２２", "bad port"),  # full-width digits pass str.isdigit()
        ("nats://h1:²", "bad port"),
        ("nats://h1:99999", "bad port"),
        ("nats://h1:0", "bad port"),
        ("nats://[::1", "bad IPv6"),
        ("redis://h/0?a=1&a=2", "given twice"),
    ],
)
def test_malformed_urls_are_config_errors(url: str, says: str) -> None:
    with pytest.raises(errors.ConfigError, match=says):
        urls.parse(url)


@given(st.text(max_size=200))
def test_parse_never_fails_untyped(text: str) -> None:
    try:
        parsed = urls.parse("x://" + text)
    except errors.ConfigError:
        return
    assert parsed.scheme == "x"
    parsed.redacted()
