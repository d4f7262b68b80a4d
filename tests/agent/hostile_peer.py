"""The hostile peer, as a program of its own (so its memory and CPU are not the measured
process's). It plays a hostile controller against a Keel agent, or a hostile Keel agent or
qemu-ga against a controller, with one attack each time:

  python hostile_peer.py controller ATTACK PATH [--seconds S]
      attack the agent listening on unix socket PATH; print one JSON line: what came back
  python hostile_peer.py agent ATTACK PATH [--qga]
      listen on PATH as a hostile agent until killed. ``core.ping`` (``guest-ping``) and
      syncs are answered properly; any other call gets the attack (once per connection for
      the stalls, every time otherwise), so a test can check that the client recovers.

Every loop here is bounded and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os

import msgspec

from keel.agent import _protocol as p

ATTACKS = (
    "random_bytes",
    "huge_length",
    "endless_frame",
    "half_frame_stall",
    "deep_nesting",
    "flood_disconnect",
    "parallel_stalls",
)
PARALLEL = 30
FLOOD = 40_000
BIG = p.DEFAULT_MAX_FRAME - 1
DEEP = 200_000


def junk(n: int) -> bytes:
    """Random bytes that hold no sync token (the attack must not resync by luck)."""
    return os.urandom(n).replace(p.SYNC_PREFIX[:2], b"..")


def framed(payload: bytes) -> bytes:
    return p.HEADER.pack(p.MAGIC, len(payload)) + payload


def deep_frame(message: list[object]) -> bytes:
    """``message`` with its last item (a None) replaced by 200,000 nested arrays."""
    prefix = msgspec.msgpack.encode(message)
    assert prefix.endswith(b"\xc0")
    return framed(prefix[:-1] + b"\x91" * DEEP + b"\xc0")


# --- a hostile controller ---------------------------------------------------------------------


class Conn:
    """One connection to the agent, collecting the error codes it sends back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = p.FrameDecoder()
        self.decoder.hunt()
        self.codes: list[str] = []
        self.messages: list[str] = []
        self.closed = False
        self._acked = asyncio.Event()
        self._welcome = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                data = await self.reader.read(1 << 20)
            except ConnectionError:
                data = b""
            if not data:
                self.closed = True
                return
            for event in self.decoder.feed(data):
                if isinstance(event, p.Sync) and event.ack:
                    self._acked.set()
                elif isinstance(event, p.Frame):
                    msg = p.decode(event.payload)
                    if isinstance(msg, p.Welcome):
                        self._welcome.set()
                    elif isinstance(msg, p.Error):
                        self.codes.append(msg.code)
                        self.messages.append(msg.message)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def handshake(self) -> None:
        for _ in range(40):
            await self.send(p.sync_token(7))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), 0.5)
                break
        await self.send(p.encode(p.Hello((1,), "hostile", p.DEFAULT_MAX_FRAME)))
        await asyncio.wait_for(self._welcome.wait(), 10)

    async def resync(self) -> None:
        self._acked.clear()
        for _ in range(40):
            await self.send(p.sync_token(8))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), 0.5)
                return

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def connect(path: str) -> Conn:
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 22)
    conn = Conn(reader, writer)
    await conn.handshake()
    return conn


async def as_controller(attack: str, path: str, seconds: float) -> dict[str, object]:
    conns = [await connect(path) for _ in range(PARALLEL if attack == "parallel_stalls" else 1)]
    first = conns[0]
    if attack == "random_bytes":
        for _ in range(16):
            await first.send(junk(64 * 1024))
            await asyncio.sleep(0.02)
        await first.resync()
    elif attack == "huge_length":
        await first.send(p.HEADER.pack(p.MAGIC, 2**32 - 1) + junk(1000))
        await first.resync()
    elif attack == "endless_frame":
        await first.send(p.HEADER.pack(p.MAGIC, BIG))
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end and not first.closed:
            await first.send(junk(4096))  # never a whole frame: it trickles in forever
            await asyncio.sleep(0.02)
        await first.resync()
    elif attack == "half_frame_stall":
        await first.send(p.HEADER.pack(p.MAGIC, BIG) + junk(BIG // 2))
        await asyncio.sleep(seconds)
        await first.resync()
    elif attack == "deep_nesting":
        await first.send(deep_frame(["call", 1, "core", "ping", {"x": None}]))
        await first.resync()
    elif attack == "flood_disconnect":
        calls = b"".join(p.encode(p.Call(i + 1, "core", "ping")) for i in range(FLOOD))
        first.writer.write(calls)
        first.writer.transport.abort()  # gone at once, with the flood unread
    elif attack == "parallel_stalls":
        await asyncio.gather(
            *(c.send(p.HEADER.pack(p.MAGIC, BIG) + junk(3 * 1024 * 1024)) for c in conns)
        )
        await asyncio.sleep(seconds)
    else:
        raise SystemExit(f"unknown attack {attack}")
    await asyncio.sleep(0.2)  # the agent's last answers
    result = {
        "codes": sorted({code for c in conns for code in c.codes}),
        "messages": sorted({m for c in conns for m in c.messages})[:10],
        "closed": any(c.closed for c in conns),
    }
    for conn in conns:
        await conn.close()
    return result


# --- a hostile Keel agent -------------------------------------------------------------------

Writer = asyncio.StreamWriter


async def keel_attack(attack: str, w: Writer, call: p.Call) -> bool:
    """Answer ``call`` with the attack; False when the connection is to end."""
    if attack == "random_bytes":
        w.write(junk(64 * 1024))
    elif attack == "huge_length":
        w.write(p.HEADER.pack(p.MAGIC, 2**32 - 1) + junk(1000))
    elif attack == "endless_frame":
        w.write(p.HEADER.pack(p.MAGIC, BIG))
        for _ in range(1500):  # 30 s at most
            w.write(junk(4096))
            await w.drain()
            await asyncio.sleep(0.02)
    elif attack == "half_frame_stall":
        w.write(p.HEADER.pack(p.MAGIC, BIG) + junk(BIG // 2))
        await w.drain()
        await asyncio.sleep(30)
    elif attack == "deep_nesting":
        w.write(deep_frame(["result", call.id, None]))
    elif attack == "flood_disconnect":
        w.write(b"".join(p.encode(p.Result(10**9 + i, {})) for i in range(FLOOD)))
        await w.drain()
        return False
    elif attack == "parallel_stalls":
        w.write(p.HEADER.pack(p.MAGIC, BIG) + junk(int(3.5 * 1024 * 1024)))
        await w.drain()
        await asyncio.sleep(30)
    await w.drain()
    return True


async def serve_keel(attack: str, reader: asyncio.StreamReader, w: Writer) -> None:
    decoder = p.FrameDecoder()
    decoder.hunt()
    for _ in range(10_000):
        data = await reader.read(1 << 20)
        if not data:
            return
        for event in decoder.feed(data):
            if isinstance(event, p.Sync) and not event.ack:
                w.write(p.ack_token(event.nonce))
            elif isinstance(event, p.Frame):
                msg = p.decode(event.payload)
                if isinstance(msg, p.Hello):
                    w.write(p.encode(p.Welcome(1, "evil", "i-evil", {}, p.DEFAULT_MAX_FRAME, 8)))
                elif isinstance(msg, p.Call) and msg.command == "ping":
                    w.write(p.encode(p.Result(msg.id, {})))
                elif isinstance(msg, p.Call) and not await keel_attack(attack, w, msg):
                    return
        await w.drain()


# --- a hostile qemu-ga -----------------------------------------------------------------------


async def qga_attack(attack: str, w: Writer, request: dict[str, object]) -> bool:
    if attack == "random_bytes":
        w.write(junk(64 * 1024) + b"\n")
    elif attack == "huge_length":
        w.write(b'{"return": "' + b"a" * (17 * 1024 * 1024) + b'"}\n')
    elif attack == "endless_frame":
        w.write(b'{"return": "')
        for _ in range(1500):
            w.write(b"a" * 4096)
            await w.drain()
            await asyncio.sleep(0.02)
    elif attack == "half_frame_stall":
        w.write(b'{"return": "' + b"a" * (2 * 1024 * 1024))
        await w.drain()
        await asyncio.sleep(30)
    elif attack == "deep_nesting":
        w.write(b"[" * 100_000 + b"\n")
    elif attack == "flood_disconnect":
        w.write(b"".join(b'{"return": {}, "id": %d}\n' % (10**9 + i) for i in range(FLOOD)))
        await w.drain()
        return False
    elif attack == "parallel_stalls":
        w.write(b'{"return": "' + b"a" * (int(3.5 * 1024 * 1024)))
        await w.drain()
        await asyncio.sleep(30)
    await w.drain()
    return True


async def serve_qga(attack: str, reader: asyncio.StreamReader, w: Writer) -> None:
    for _ in range(10_000):
        line = await reader.readline()
        if not line:
            return
        try:
            request = json.loads(line.replace(b"\xff", b""))
        except ValueError:
            continue
        command = request.get("execute")
        if command == "guest-sync-delimited":
            w.write(b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n")
        elif command == "guest-ping":
            w.write(json.dumps({"return": {}, "id": request.get("id")}).encode() + b"\n")
        elif not await qga_attack(attack, w, request):
            return
        await w.drain()


async def as_agent(attack: str, path: str, qga: bool) -> None:
    serve = serve_qga if qga else serve_keel

    async def handle(reader: asyncio.StreamReader, writer: Writer) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
            await serve(attack, reader, writer)
        writer.close()

    server = await asyncio.start_unix_server(handle, path + ".tmp", limit=1 << 22)
    os.rename(path + ".tmp", path)  # the socket appears only once it accepts
    async with server:
        await asyncio.sleep(600)  # the test kills it long before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["controller", "agent"])
    parser.add_argument("attack", choices=ATTACKS)
    parser.add_argument("path")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--qga", action="store_true")
    args = parser.parse_args()
    if args.role == "controller":
        print(json.dumps(asyncio.run(as_controller(args.attack, args.path, args.seconds))))
    else:
        asyncio.run(as_agent(args.attack, args.path, args.qga))


if __name__ == "__main__":
    main()
