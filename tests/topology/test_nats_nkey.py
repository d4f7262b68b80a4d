"""NATS logins with an nkey (issue 19: "NATS TLS with user/password or nkeys"), against the
real server of scripts/servers.d/nats-tls.sh, which lists the public key of the test seed
``user.nk`` (tests/tls_certs.py) beside its password user.

The right seed connects and serves a call; a seed the server does not know is a typed
`CredentialsRejected` from ``connect`` naming the public key, never the seed; a missing or
malformed seed file and a URL with both a password and an nkey are `ConfigError` up front. No
seed ever reaches a log line, an error or a metric.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import prometheus_client
import pytest

from keel import errors, urls
from keel.messaging import connect
from tests import tls_certs
from tests.servers import server_url
from tests.topology.tls_checks import call_over as use_transport

pytestmark = [pytest.mark.timeout(120)]

PASSWORD_LOGIN = "keel:keel-tls-pw@"  # scripts/servers.d/nats-tls.sh's password user


@pytest.fixture(scope="module")
def tls_dir() -> Path:
    directory = Path(urls.from_env("servers_dir", "/tmp/keel-servers")) / "tls"
    tls_certs.make(directory)
    return tls_certs.make_nkeys(directory)


@pytest.fixture(scope="module")
def url(tls_dir: Path) -> str:
    password_url = server_url("nats-tls")
    assert PASSWORD_LOGIN in password_url, password_url
    return password_url.replace(PASSWORD_LOGIN, "")


def _seeds(tls_dir: Path) -> list[str]:
    return [(tls_dir / n).read_text().strip() for n in ("user.nk", "stranger.nk")]


def _no_seed(tls_dir: Path, *texts: str) -> None:
    for seed in _seeds(tls_dir):
        for text in texts:
            assert seed not in text
            assert seed[2:20] not in text  # not even a part of it


async def test_the_right_seed_logs_in(
    url: str, tls_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await use_transport(f"{url}&nkey={tls_dir / 'user.nk'}")  # a call served end to end
    _no_seed(tls_dir, caplog.text)


async def test_the_seed_file_may_come_from_the_keyword_or_the_environment(
    url: str, tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = await connect(url, nkey=str(tls_dir / "user.nk"))
    await transport.close()
    monkeypatch.setenv("KEEL_NATS_NKEY", str(tls_dir / "user.nk"))
    transport = await connect(url)
    await transport.close()
    # The variable fills only what the URL leaves out: a password login still works.
    transport = await connect(url.replace("nats+tls://", f"nats+tls://{PASSWORD_LOGIN}"))
    await transport.close()


async def test_a_seed_the_server_does_not_know_is_rejected_by_name(
    url: str, tls_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stranger = tls_dir / "stranger.nk"
    with pytest.raises(errors.CredentialsRejected) as info:
        await asyncio.wait_for(connect(f"{url}&nkey={stranger}"), 30)
    message = str(info.value)
    assert tls_certs.public_key(stranger) in message
    assert "does not list that nkey" in message
    metrics = prometheus_client.generate_latest().decode()
    _no_seed(tls_dir, message, repr(info.value), caplog.text, metrics)


@pytest.mark.parametrize("content", ["", "not a seed\n", "SUAAAA\n", "UAQ" + "A" * 53 + "\n"])
async def test_a_malformed_seed_file_is_a_config_error(
    url: str, tmp_path: Path, content: str
) -> None:
    seed_file = tmp_path / "bad.nk"
    seed_file.write_text(content)
    with pytest.raises(errors.ConfigError, match="not an nkey user seed") as info:
        await connect(f"{url}&nkey={seed_file}")
    assert content.strip() == "" or content.strip() not in str(info.value)


async def test_a_missing_seed_file_is_a_config_error(url: str, tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match=r"nkey=.*cannot read"):
        await connect(f"{url}&nkey={tmp_path / 'absent.nk'}")


async def test_a_password_and_an_nkey_together_is_a_config_error(url: str, tls_dir: Path) -> None:
    both = url.replace("nats+tls://", f"nats+tls://{PASSWORD_LOGIN}")
    with pytest.raises(errors.ConfigError, match="not both"):
        await connect(f"{both}&nkey={tls_dir / 'user.nk'}")
