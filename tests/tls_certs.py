"""Test certificates, made with trustme: one CA, a server certificate for 127.0.0.1 and
localhost, a client certificate, and the bad ones the TLS tests present (another CA, an
expired client certificate; server certificates of the same CA that are expired, not yet
valid, issued for another host, or for 127.0.0.1 only, which tests/topology/tls_proxy.py
presents in front of the real servers). Keys are PKCS#8 PEM, which every server here reads
(ZooKeeper's PEM loader takes no other form).

``python tests/tls_certs.py DIR`` writes them (scripts/servers does, for the TLS servers, when
DIR has none yet); `make` is the same for fixtures. Existing files are kept, so servers already
running with them stay valid.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

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
    tmp.write_bytes(data)
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


if __name__ == "__main__":
    make(Path(sys.argv[1]))
