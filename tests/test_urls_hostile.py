"""Backend URLs and TLS options as an outsider would write them, by mistake or on purpose:
reserved characters in passwords, multi-host forms, IPv6 literals, unicode digits, huge ports,
control characters, duplicate, unknown and contradictory options. Each is a `ConfigError`
whose message never shows the password (nor any part of it), or a parse that keeps every
endpoint. In-process only; the real servers are in tests/topology/test_tls.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

import keel.coordination
from keel import _tls, errors, urls
from keel.cli import app
from keel.messaging import connect
from tests import tls_certs

SECRET = "Sx9-secret"  # every password below holds it, so a test can search for it


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tls_certs.make(tmp_path_factory.mktemp("certs"))


def _pieces(password: str) -> list[str]:
    """Runs of a password long enough to mean something if they leak."""
    return [p for p in password.replace("%", " ").split() if len(p) >= 3]


@pytest.mark.parametrize(
    "url",
    [
        f"rabbit://u:pa/{SECRET}@h1:5672/vh",  # '/' unencoded: the authority ends early
        f"rabbit://u:12/{SECRET}@h1:5672/vh",  # ... and "u:12" reads as a host and a port
        f"rabbit://u:pa,{SECRET}@h1:5672/vh",  # ',' unencoded: two endpoints
        f"rabbit://u:12,{SECRET}@h1:5672/vh",  # ... the first "u:12", the second "Sx9-...@h1"
        f"rabbit://u:p@h1,v:12,{SECRET}@h2/vh",
        f"rabbit://u:pa?{SECRET}@h1:5672/vh",  # '?': the rest reads as options
        f"rabbit://u:12?a={SECRET}@h1/vh",
        f"rabbit://u:12#{SECRET}@h1/vh",  # '#': a fragment
        f"nats://u:{SECRET}@h1:4222,,h2",  # an empty endpoint
        f"redis://u:{SECRET}@h1:notaport/0",
        f"redis://u:{SECRET}@h 1/0",
        f"redis://u:{SECRET}@h1/0\nINFO fake log line",
        f"{SECRET}@h1:5672",  # no scheme
    ],
)
def test_a_malformed_url_is_refused_without_showing_its_password(url: str) -> None:
    with pytest.raises(errors.ConfigError) as info:
        urls.parse(url)
    for text in (str(info.value), repr(info.value), urls.redact(url)):
        for piece in _pieces(SECRET):
            assert piece not in text, text
        assert "\n" not in text


@pytest.mark.parametrize(
    ("password", "encoded"),
    [
        ("a/b?c#d", "a%2Fb%3Fc%23d"),
        ("a,b@c:d", "a%2Cb%40c:d"),  # ':' in a password needs no encoding
        ("päss wörd", "p%C3%A4ss%20w%C3%B6rd"),
        ("%41", "%2541"),  # a literal percent sign
    ],
)
def test_percent_encoded_passwords_come_back_exact(password: str, encoded: str) -> None:
    url = urls.parse(f"rabbit://us%3Aer:{encoded}@h1:5672,h2/vh")
    assert [(h.username, h.password) for h in url.hosts] == [("us:er", password)] * 2
    assert encoded not in url.redacted()
    assert password not in repr(url)


def test_repr_and_str_of_a_parsed_url_never_show_a_password() -> None:
    url = urls.parse(f"redis+sentinel://u:{SECRET}@s1:26379,s2/keel/0?sentinel_password={SECRET}")
    for text in (repr(url), str(url), repr(url.hosts), str(url.hosts[1]), repr([url])):
        assert SECRET not in text, text
    assert "u:***@s1:26379" in repr(url)


@pytest.mark.parametrize(
    ("url", "default", "endpoints"),
    [
        (
            "etcd://[::1]:2379,127.0.0.1,[fe80::1%25eth0]:2380",
            2379,
            ["[::1]:2379", "127.0.0.1:2379", "[fe80::1%eth0]:2380"],
        ),
        ("nats://h1,h2:4223,h3", 4222, ["h1:4222", "h2:4223", "h3:4222"]),
        ("rabbit://u:p@h1:5672,v:q@h2:5673,h3/", 5672, ["h1:5672", "h2:5673", "h3:5672"]),
        ("zookeeper://bücher.example:2181", 2181, ["bücher.example:2181"]),
    ],
)
def test_every_listed_endpoint_is_kept_in_order(
    url: str, default: int, endpoints: list[str]
) -> None:
    assert urls.parse(url).endpoints(default) == endpoints


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("nats://h1:٣٣", "bad port"),  # Arabic-Indic digits pass str.isdigit()
        ("nats://h1:４２２２", "bad port"),
        ("nats://h1:" + "9" * 400, "bad port"),  # no int() of a huge number either
        ("nats://h1:65536", "bad port"),
        ("nats://h1:-1", "bad port"),
        ("nats://h1:+80", "bad port"),
        ("nats://h1:", "bad port"),
        ("nats://:4222", "empty host"),
        ("nats://h1,", "empty host"),
        ("nats://::1", "bad port"),  # an IPv6 address needs brackets
        ("nats://[::1", "bad IPv6"),
        ("nats://[::1]x", "bad IPv6"),
        ("nats://[::g]:4222", "bad IPv6"),
        ("nats://h%00x", "bad host"),
        ("nats://h/x?a=1&a=2", "given twice"),
        ("nats://h/x?a=1#frag", "fragment"),
    ],
)
def test_malformed_endpoints_are_config_errors(url: str, says: str) -> None:
    with pytest.raises(errors.ConfigError, match=says):
        urls.parse(url)


async def test_unknown_options_are_refused_with_the_ones_known() -> None:
    with pytest.raises(errors.ConfigError, match=r"'cafile'.*it knows: .*\bca\b"):
        await connect("rabbit://127.0.0.1:1/?cafile=/etc/ca.pem&heartbeat=10")
    with pytest.raises(errors.ConfigError, match="'tsl'"):
        await connect("redis://127.0.0.1:1/0?tsl=true")
    with pytest.raises(errors.ConfigError, match="'socket_timeut'"):
        await keel.coordination.connect("redis://127.0.0.1:1/0?socket_timeut=1")
    with pytest.raises(errors.ConfigError, match="'conect_timeout'"):
        await keel.coordination.connect("etcd://127.0.0.1:1", conect_timeout="1")
    with pytest.raises(errors.ConfigError, match="'ttl'"):
        await keel.coordination.connect("sqlite:///tmp/keel-x.db?ttl=3")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("rediss://h/0?tls=false", "contradicts the rediss:// scheme"),
        ("amqps://h/?tls=0", "contradicts the amqps:// scheme"),
        ("redis://h/0?tls=false&ca={d}/ca.pem", "tls=false contradicts ca="),
        ("redis://h/0?tls=maybe", "tls='maybe'"),
        ("redis://h/0?tls=", "tls=''"),
        ("redis://h/0?key={d}/client.key", "TLS is off"),
        ("redis://h/0?verify=none", "TLS is off"),
        ("rediss://h/0?verify=none&ca={d}/ca.pem", "verify=none ignores ca="),
        ("rediss://h/0?ca=", "ca=: no such readable file"),
        ("rediss://h/0?cert={d}/client.pem&key={d}/other-client.key", "cannot load"),
    ],
)
def test_contradictory_tls_options_are_refused_not_resolved_toward_plaintext(
    certs: Path, url: str, says: str
) -> None:
    parsed = urls.parse(url.format(d=certs))
    with pytest.raises(errors.ConfigError) as info:
        _tls.tls_config(parsed, secure_scheme=parsed.scheme in ("rediss", "amqps"))
    assert says in str(info.value)


def test_the_environment_fills_tls_options_but_never_turns_tls_off(
    certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_TLS_CA", str(certs / "ca.pem"))
    assert _tls.tls_config(urls.parse("redis://h/0")) is None  # nor on
    config = _tls.tls_config(urls.parse("rediss://h/0"), secure_scheme=True)
    assert config is not None
    assert config.ca == str(certs / "ca.pem")
    monkeypatch.setenv("KEEL_TLS_VERIFY", "sometimes")
    with pytest.raises(errors.ConfigError, match="verify='sometimes'"):
        _tls.tls_config(urls.parse("rediss://h/0"), secure_scheme=True)


def test_no_help_text_shows_a_secret_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("TRANSPORT_URL", "COORDINATION_URL", "STORE_URL", "HUB_STORE"):
        monkeypatch.setenv(f"KEEL_{name}", f"rabbit://u:{SECRET}@h1/")
    monkeypatch.setenv("KEEL_KEYSTONE_PASSWORD", SECRET)
    root = typer.main.get_command(app)
    paths: list[list[str]] = [[]]
    todo: list[tuple[object, list[str]]] = [(root, [])]
    while todo:
        command, path = todo.pop()
        for name, sub in getattr(command, "commands", {}).items():
            paths.append([*path, name])
            todo.append((sub, [*path, name]))
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert SECRET not in result.output, path


def test_a_crash_in_the_cli_prints_no_locals() -> None:
    # Typer's rich tracebacks show every local variable (a URL with its password) when
    # asked to; Keel's commands never ask, whatever Typer's default.
    assert app.pretty_exceptions_show_locals is False


def test_bad_store_password_on_the_cli_is_masked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.NOTSET)
    result = CliRunner().invoke(
        app, ["hub", "serve", "--store", f"postgresql://u:{SECRET}@127.0.0.1:1/db/x?y#z"]
    )
    assert result.exit_code == 2, result.output
    assert SECRET not in result.output
    assert SECRET not in caplog.text


@given(
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=24),
    st.lists(st.sampled_from(["h1", "h2:5672", "[::1]:1", "h3"]), min_size=1, max_size=3),
)
def test_any_password_either_parses_back_exactly_or_never_shows(
    password: str, hosts: list[str]
) -> None:
    url = f"rabbit://user:{password}@{','.join(hosts)}/vh"
    try:
        parsed = urls.parse(url)
    except errors.ConfigError as exc:
        text = str(exc)
    else:
        if parsed.password == password:
            assert all(h.password == password for h in parsed.hosts)
        text = parsed.redacted() + repr(parsed)
    for piece in _pieces(password.replace("@", " ").replace(":", " ")):
        if piece not in "rabbit://user@h1,h2:5672,[::1]:1,h3/vh":
            assert piece not in text, (url, text)
