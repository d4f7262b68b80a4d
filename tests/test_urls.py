from __future__ import annotations

import pytest

from keel import errors, urls
from keel.messaging import connect


def test_parse() -> None:
    url = urls.parse("rabbit://user:s3cret@127.0.0.1:5672/vhost?heartbeat=10")
    assert (url.scheme, url.host, url.port, url.username, url.path) == (
        "rabbit",
        "127.0.0.1",
        5672,
        "user",
        "/vhost",
    )
    assert url.options == {"heartbeat": "10"}
    assert "s3cret" not in url.redacted()


def test_bad_urls_are_clear() -> None:
    with pytest.raises(errors.ConfigError, match="not a backend URL"):
        urls.parse("localhost:5672")
    with pytest.raises(errors.ConfigError, match="bad port"):
        urls.parse("redis://host:notaport/0")


def test_unknown_scheme_lists_known_ones() -> None:
    with pytest.raises(errors.UnknownScheme, match="memory"):
        urls.resolve("transport", "kafka://127.0.0.1:9092")


def test_missing_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        urls._BUILTIN["transport"],
        "fake",
        urls.BackendRef("no_such_client_library:Thing", extra="fake"),
    )
    with pytest.raises(errors.MissingExtra, match=r"keel\[fake\]") as info:
        urls.resolve("transport", "fake://x")
    assert isinstance(info.value, ImportError)


async def test_connect_uses_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_TRANSPORT_URL", "memory://from-env")
    transport = await connect()
    assert transport.url.raw == "memory://from-env"
    await transport.close()
    with pytest.raises(errors.ConfigError, match="bad option"):
        await connect("memory://", no_such_option=1)
