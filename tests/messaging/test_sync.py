"""The blocking facade: the same operations and errors as the async API, from plain threads."""

from __future__ import annotations

import threading

import pytest

from keel import errors, sync
from keel.messaging import RequestContext, Target


class Greeter:
    def hello(self, ctx: RequestContext, name: str) -> str:
        return f"hello {name} from {threading.current_thread().name.split('_')[0]}"

    def fail(self, ctx: RequestContext) -> None:
        raise errors.Conflict("already resizing")


class Sink:
    def __init__(self) -> None:
        self.got: list[object] = []
        self.event = threading.Event()

    def info(
        self, ctx: object, publisher: str, event_type: str, payload: object, md: object
    ) -> None:
        self.got.append(payload)
        self.event.set()


def test_blocking_client_server_and_notifications() -> None:
    with sync.connect("memory://sync-test") as transport:
        with sync.RPCServer(transport, Target("greeter"), [Greeter()]) as server:
            client = sync.RPCClient(transport, Target("greeter"), timeout=5)
            assert client.call(None, "hello", name="ann").startswith("hello ann from keel-greeter")
            with pytest.raises(errors.Conflict):
                client.call(None, "fail")
            with pytest.raises(errors.CallTimeout):
                client.prepare(server="nobody", timeout=0.2).call(None, "hello", name="x")
            client.cast(None, "hello", name="cast")
            client.fanout(None, "hello", name="fanout")
            assert server.state.value == "serving"
        sink = Sink()
        with sync.NotificationListener(transport, [Target("sync-notes")], [sink]):
            sync.Notifier(transport, "pub", topics=["sync-notes"]).info(None, "e", {"k": 1})
            assert sink.event.wait(5)
        assert sink.got == [{"k": 1}]
