"""uvicorn's HTTP protocols with the hub's JSON error body on a request it cannot parse.

A request that is not valid HTTP (a `Transfer-Encoding: nil`, a broken request line) never
reaches the application: uvicorn answers 400 itself, in text/plain. A client of the hub is
promised a JSON error on every 4xx, so the server layer answers in the same shape (the
Zaqar face's shape under /v2, when the request target got that far). So does a WebSocket
handshake the websockets library refuses (no Sec-WebSocket-Key, a bad version) or uvicorn
refuses (403 for a path with no WebSocket route).

A request head is bounded (`MAX_HEAD` bytes, request line and headers): httptools itself
keeps every header it is sent, so one client streaming headers without end grew the hub's
memory without bound; past the bound the answer is a JSON 431 and the connection closes.
"""

from __future__ import annotations

import asyncio
import http
from typing import Any

import h11
import msgspec
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.datastructures import Headers
from websockets.http11 import Response

try:  # uvicorn picks httptools when it is installed, h11 otherwise; so do we
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency of uvicorn[standard]
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


# Request line and headers, in bytes (h11 is given the same bound as its buffer's).
MAX_HEAD = 64 * 1024

# After a refusal the connection reads on for a moment, dropping what comes: a close with
# unread bytes makes the kernel send a reset, and a client still sending (a long head, a
# body) lost the answer with it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024

_CODES = {400: "bad_request", 403: "forbidden", 404: "not_found", 431: "too_large"}


def _body(message: str, url: bytes = b"", status: int = 400) -> bytes:
    if url.startswith(b"/v2"):  # the Zaqar face: its clients read Zaqar's error shape
        return msgspec.json.encode(
            {"title": http.HTTPStatus(status).phrase, "description": message}
        )
    code = _CODES.get(status, "internal" if status >= 500 else "bad_request")
    error = {"code": code, "message": message, "status": status}
    return msgspec.json.encode({"error": error})


def _head(length: int, status: int = 400) -> bytes:
    line = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode("ascii")
    return (
        line + b"content-type: application/json\r\n"
        b"content-length: " + str(length).encode("ascii") + b"\r\n"
        b"connection: close\r\n\r\n"
    )


def _answer_and_linger(transport: asyncio.Transport, answer: bytes) -> None:
    transport.write(answer)
    if transport.can_write_eof():  # not under TLS: there the timer alone closes
        transport.write_eof()
    asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)


def _dropped(protocol: Any, data: bytes) -> bool:
    """Whether ``data`` came after a refusal (counted, dropped; too much of it closes)."""
    if protocol._discarded < 0:
        return False
    protocol._discarded += len(data)
    if protocol._discarded > LINGER_BYTES:
        protocol.transport.close()
    return True


class JsonErrorsH11(H11Protocol):
    _start = b""
    _discarded = -1  # bytes dropped since the refusal; -1: not refused

    def data_received(self, data: bytes) -> None:
        if _dropped(self, data):
            return
        # h11 keeps no request target when it cannot parse the head: the start of each
        # request is kept here, as far as the face (/v2 or not) needs it.
        if self.conn.their_state is h11.IDLE:
            self._start = data[:64]
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        # Plain bytes, as uvicorn's httptools protocol sends its own: the same answer from both.
        parts = self._start.split(b" ", 2)
        body = _body(msg, parts[1] if len(parts) > 1 else b"")
        self._discarded = 0
        _answer_and_linger(self.transport, _head(len(body)) + body)


if HttpToolsProtocol is not None:

    class JsonErrorsHttpTools(HttpToolsProtocol):
        # Bytes of the head being read, counted per read after the parser took it; the read
        # that starts a head is not counted (where in it the head starts is not known), so a
        # head is refused at most one read (256 KiB) past `MAX_HEAD`.
        _head_bytes = 0
        _in_head = False
        _begun = False  # a head began in the read being parsed
        _discarded = -1  # bytes dropped since the refusal; -1: not refused

        def data_received(self, data: bytes) -> None:
            if _dropped(self, data):
                return
            self._begun = False
            super().data_received(data)
            if self._in_head and not self._begun and self._discarded < 0:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD:
                    self._refuse(431, f"the request head is larger than {MAX_HEAD} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = self._begun = True
            self._head_bytes = 0

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, msg)

        def _refuse(self, status: int, msg: str) -> None:
            # The request target, as far as it was parsed (none before the first message).
            body = _body(msg, getattr(self, "url", None) or b"", status)
            self._discarded = 0
            _answer_and_linger(self.transport, _head(len(body), status) + body)

    HTTP_PROTOCOL: type[H11Protocol] | type[HttpToolsProtocol] = JsonErrorsHttpTools
else:  # pragma: no cover
    HTTP_PROTOCOL = JsonErrorsH11


class JsonErrorsWebSockets(WebSocketsSansIOProtocol):
    """uvicorn's websockets protocol, whose refusals of a handshake answer in JSON: every one
    (the library's 400 for a handshake it cannot accept, uvicorn's 403 for an application
    that closes before accepting, its 500) is made by the protocol's `reject`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn.reject = self._reject  # type: ignore[method-assign]

    def _reject(self, status: http.HTTPStatus | int, text: str) -> Response:
        status = http.HTTPStatus(status)
        request = getattr(self, "request", None)  # None: the handshake did not parse
        url = request.path.encode("utf-8", "replace") if request is not None else b""
        body = _body(text.strip() or status.phrase, url, status.value)
        headers = Headers(
            [
                ("Connection", "close"),
                ("Content-Length", str(len(body))),
                ("Content-Type", "application/json"),
            ]
        )
        return Response(status.value, status.phrase, headers, body)
