"""A TLS terminator in front of a real TLS server, presenting a certificate of our choosing:
expired, not yet valid, issued for another host, or a good one for its own address.

It relays bytes as they come until the client starts its TLS handshake (at once for most
protocols; after NATS's INFO line or PostgreSQL's SSLRequest for those that speak first in
plaintext), then finishes the handshake with the client using that certificate and opens its
own TLS connection to the server (the test CA, the test client certificate, the ALPN the
client chose), and relays the decrypted bytes. So a client that rejects the certificate gets
no further, and one that wrongly accepts it really does its work on the real server: a test
sees the difference. Loopback only; one thread per connection; every loop ends with its
sockets.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from pathlib import Path
from typing import TypeVar

_Sock = TypeVar("_Sock", bound=socket.socket)
_TLS_RECORD = b"\x16\x03"  # a TLS handshake record: the client's hello


class TLSProxy:
    """Listens on 127.0.0.1 (``port``), presenting the certificate ``<kind>-server.pem`` of
    tests/tls_certs.py (``expired``, ``not-yet-valid``, ``other-host``, ``ip``) to clients;
    forwards to the TLS server at ``upstream`` (a port on 127.0.0.1). ``handshakes`` counts
    the clients that completed a handshake with it (that accepted the certificate)."""

    def __init__(self, kind: str, upstream: int, certs: Path) -> None:
        self._upstream = upstream
        self._server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_ctx.load_cert_chain(certs / f"{kind}-server.pem", certs / f"{kind}-server.key")
        self._server_ctx.set_alpn_protocols(["h2", "http/1.1"])
        self._certs = certs
        self.handshakes = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._closed = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.close()

    def __enter__(self) -> TLSProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _track(self, sock: _Sock) -> _Sock:
        with self._lock:
            self._open.add(sock)
        return sock

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        try:
            upstream = self._track(socket.create_connection(("127.0.0.1", self._upstream), 5))
        except OSError:
            client.close()
            return
        try:
            if self._plaintext_until_hello(client, upstream):
                self._tls(client, upstream)
        except (OSError, ssl.SSLError):
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()

    def _plaintext_until_hello(self, client: socket.socket, upstream: socket.socket) -> bool:
        """Relay until the client's next bytes are a TLS hello (True), or a side hangs up."""
        while not self._closed.is_set():
            ready, _, _ = select.select([client, upstream], [], [], 0.5)
            if client in ready:
                head = client.recv(2, socket.MSG_PEEK)
                if not head:
                    return False
                if head == _TLS_RECORD:
                    return True
                upstream.sendall(client.recv(65536))
            if upstream in ready:
                data = upstream.recv(65536)
                if not data:
                    return False
                client.sendall(data)
        return False

    def _tls(self, client: socket.socket, upstream: socket.socket) -> None:
        # wrap_socket takes over the descriptor: the TLS sockets are the ones to close, at
        # once when a side hangs up (a client closing waits for the TCP close, not a timeout).
        front = self._track(self._server_ctx.wrap_socket(client, server_side=True))
        with contextlib.closing(front):
            self.handshakes += 1
            back_ctx = ssl.create_default_context(cafile=str(self._certs / "ca.pem"))
            back_ctx.load_cert_chain(self._certs / "client.pem", self._certs / "client.key")
            chosen = front.selected_alpn_protocol()
            if chosen:
                back_ctx.set_alpn_protocols([chosen])
            back = self._track(back_ctx.wrap_socket(upstream, server_hostname="127.0.0.1"))
            with contextlib.closing(back):
                self._relay({front: back, back: front})

    def _relay(self, pair: dict[ssl.SSLSocket, ssl.SSLSocket]) -> None:
        while not self._closed.is_set():
            waiting = [s for s in pair if s.pending()]
            if not waiting:
                waiting, _, _ = select.select(list(pair), [], [], 0.5)
            for sock in waiting:
                data = _read(sock)
                if data == b"":
                    return
                if data is not None:
                    pair[sock].sendall(data)


def _read(sock: ssl.SSLSocket) -> bytes | None:
    """What a readable TLS socket holds, b"" at its end, or None when the record was no data
    (a TLS 1.3 session ticket that OpenSSL servers send after the handshake): a blocking
    read would wait there for data while the other direction starves."""
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return None
    finally:
        sock.setblocking(True)
