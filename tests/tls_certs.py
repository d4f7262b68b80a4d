"""Test certificates, made with trustme: one CA, a server certificate for 127.0.0.1 and
localhost, a client certificate, and the bad ones the TLS tests present (another CA, an
expired client certificate; server certificates of the same CA that are expired, not yet
valid, issued for another host, or for 127.0.0.1 only, which tests/topology/tls_proxy.py
presents in front of the real servers). Keys are PKCS#8 PEM, which every server here reads
(ZooKeeper's PEM loader takes no other form).

``python tests/tls_certs.py DIR`` writes them (scripts/servers does, for the TLS servers, when
DIR has none yet); `make` is the same for fixtures. Existing files are kept, so servers already
running with them stay valid.

Beside them, `make_nkeys` writes the NATS nkey seeds of the TLS server
(scripts/servers.d/nats-tls.sh): a user seed it lists (``user.nk``, its public key in
``user.pub``) and one it does not (``stranger.nk``); seeds are secrets, written 0600.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import nkeys
import trustme
from cryptography.hazmat.primitives import serialization

FILES = (
    "ca.pem",
    "server.pem",
    "server.key",
    "client.pem",
    "client.key",
    "other-ca.pem",
    "expired-client.pem",
    "expired-client.key",
    "other-client.pem",
    "other-client.key",
    "expired-server.pem",
    "expired-server.key",
    "not-yet-valid-server.pem",
    "not-yet-valid-server.key",
    "other-host-server.pem",
    "other-host-server.key",
    "ip-server.pem",
    "ip-server.key",
)


def _pkcs8(blob: bytes) -> bytes:
    key = serialization.load_pem_private_key(blob, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)  # a seed is never 0644
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    tmp.replace(path)


def make(directory: Path) -> Path:
    """Write the certificates into ``directory`` unless they are all there; return it."""
    directory.mkdir(parents=True, exist_ok=True)
    if all((directory / name).exists() for name in FILES):
        return directory
    ca = trustme.CA(organization_name="Keel test CA")
    other = trustme.CA(organization_name="Keel stranger CA")
    server = ca.issue_cert("127.0.0.1", "localhost", common_name="keel-server")
    client = ca.issue_cert("keel-client", common_name="keel")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    expired = ca.issue_cert(
        "keel-client",
        common_name="keel",
        not_before=past - datetime.timedelta(days=30),
        not_after=past,
    )
    stranger = other.issue_cert("keel-client", common_name="keel")
    now, day = datetime.datetime.now(datetime.UTC), datetime.timedelta(days=1)
    bad_servers = {
        "expired-server": ca.issue_cert(
            "127.0.0.1", "localhost", not_before=now - 30 * day, not_after=now - day
        ),
        "not-yet-valid-server": ca.issue_cert(
            "127.0.0.1", "localhost", not_before=now + day, not_after=now + 30 * day
        ),
        "other-host-server": ca.issue_cert("elsewhere.example"),
        "ip-server": ca.issue_cert("127.0.0.1"),
    }
    _write(directory / "ca.pem", ca.cert_pem.bytes())
    _write(directory / "other-ca.pem", other.cert_pem.bytes())
    for name, leaf in (
        ("server", server),
        ("client", client),
        ("expired-client", expired),
        ("other-client", stranger),
        *bad_servers.items(),
    ):
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        _write(directory / f"{name}.pem", chain)
        # The server's key is read by the servers' own users (rabbitmq); libpq refuses a
        # client key others can read.
        mode = 0o644 if name.endswith("server") else 0o600
        _write(directory / f"{name}.key", _pkcs8(leaf.private_key_pem.bytes()), mode)
    return directory


NKEY_FILES = ("user.nk", "user.pub", "stranger.nk")


def _seed() -> bytes:
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def make_nkeys(directory: Path) -> Path:
    """Write the nkey seeds into ``directory`` unless they are all there; return it."""
    directory.mkdir(parents=True, exist_ok=True)
    if all((directory / name).exists() for name in NKEY_FILES):
        return directory
    user, stranger = _seed(), _seed()
    _write(directory / "stranger.nk", stranger + b"\n", 0o600)
    _write(directory / "user.nk", user + b"\n", 0o600)
    _write(directory / "user.pub", public_key(directory / "user.nk").encode() + b"\n")
    return directory


def public_key(seed_file: Path) -> str:
    return bytes(nkeys.from_seed(bytearray(seed_file.read_bytes().strip())).public_key).decode()


if __name__ == "__main__":
    make(Path(sys.argv[1]))
    make_nkeys(Path(sys.argv[1]))
