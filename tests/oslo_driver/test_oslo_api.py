"""Unchanged oslo.messaging API code on Keel's driver, on every Keel transport.

What oslo's functional suite does not cover here (it skips call monitoring and the
mandatory flag for any URL not starting with ``rabbit://``) and what the issue asks the
driver to keep: the context dict round trip, remote exceptions as oslo gives them,
``MessagingTimeout``, ``MessageDeliveryFailure`` after ``retry``, stop()/wait() as Keel's
drain, notification pools, priorities and requeue, OpenStack's server names.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.oslo import oslo_context, oslo_messaging
from tests.oslo_driver.support import Oslo, Recorder

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # oslo's executor= argument
]

Target = oslo_messaging.Target


class Delay:
    def delay(self, ctxt: Any, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def test_call_monitor_keeps_a_long_call_alive(oslo: Oslo, topic: str) -> None:
    # The scenario of the suite's test_monitor_long_call (rabbit:// only there), shorter.
    target = Target(topic=topic, server="s1")
    oslo.server(target, [Delay()])
    with pytest.raises(oslo_messaging.MessagingTimeout):
        oslo.client(target, timeout=1).call({}, "delay", seconds=2.5)
    monitored = oslo.client(target, timeout=3600, call_monitor_timeout=1)
    started = time.monotonic()
    assert monitored.call({}, "delay", seconds=2.5) == 2.5
    assert time.monotonic() - started < 10


def test_call_monitor_gives_up_on_a_silent_server(oslo: Oslo, topic: str) -> None:
    client = oslo.client(Target(topic=topic, server="nobody"), timeout=3600, call_monitor_timeout=1)
    started = time.monotonic()
    with pytest.raises(oslo_messaging.MessagingTimeout, match="heartbeat"):
        client.call({}, "delay", seconds=0)
    assert time.monotonic() - started < 5


def test_at_least_once_refuses_a_target_without_server(oslo: Oslo, topic: str) -> None:
    # The suite's test_mandatory_call: RabbitMQ's mandatory flag, here Keel's presence.
    target = Target(topic=topic, server="absent")
    plain = oslo.client(target, timeout=1)
    with pytest.raises(oslo_messaging.MessagingTimeout):
        plain.call({}, "delay", seconds=0)
    options = oslo_messaging.TransportOptions(at_least_once=True)
    mandatory = oslo.client(target, timeout=60, transport_options=options)
    started = time.monotonic()
    with pytest.raises(oslo_messaging.MessageUndeliverable):
        mandatory.call({}, "delay", seconds=0)
    assert time.monotonic() - started < 5
    oslo.server(target, [Delay()])
    assert mandatory.call({}, "delay", seconds=0) == 0


def test_context_dict_round_trips(oslo: Oslo, topic: str) -> None:
    seen = Recorder()

    class Endpoint:
        def echo(self, ctxt: Any, value: Any) -> Any:
            seen.add(ctxt)
            return value

    target = Target(topic=topic, server="s1")
    oslo.server(target, [Endpoint()])
    ctxt = {
        "user_id": "u-1",
        "project_id": "p-1",
        "roles": ["member", "reader"],
        "request_id": "req-abc",
        "global_request_id": "req-global",
        "auth_token": "secret-token",  # nova forwards the caller's token over RPC
        "service_catalog": [{"type": "volume", "endpoints": [{"url": "http://c"}]}],
        "is_admin": False,
        "read_deleted": "no",
        "user": "u-1",
    }
    client = oslo.client(target, timeout=10)
    assert client.call(dict(ctxt), "echo", value={"a": [1, 2]}) == {"a": [1, 2]}
    client.cast(dict(ctxt), "echo", value=1)
    first, second = seen.wait_for(2)
    assert first == ctxt
    assert second == ctxt


def test_arguments_arrive_as_oslo_json_would_deliver_them(oslo: Oslo, topic: str) -> None:
    class Endpoint:
        def echo(self, ctxt: Any, value: Any) -> Any:
            return value

    target = Target(topic=topic, server="s1")
    oslo.server(target, [Endpoint()])
    client = oslo.client(target, timeout=10)
    when = __import__("datetime").datetime(2026, 1, 2, 3, 4, 5, 6)
    got = client.call({}, "echo", value={"when": when, "pair": (1, 2), "set": {3}})
    assert got == {"when": "2026-01-02T03:04:05.000006", "pair": [1, 2], "set": [3]}


class Refused(Exception):
    def __init__(self, message: str = "", **kwargs: Any) -> None:
        super().__init__(message)
        self.kwargs = kwargs


def test_remote_exceptions_as_oslo_gives_them(oslo: Oslo, topic: str) -> None:
    class Endpoint:
        def fail(self, ctxt: Any, kind: str) -> None:
            if kind == "value":
                raise ValueError("ival can't go negative!")
            if kind == "timeout":
                raise TimeoutError("the disk did not answer")
            raise Refused("no room", host="h1", code=409)

    target = Target(topic=topic, server="s1")
    oslo.server(target, [Endpoint()])
    allowed = oslo.rpc_transport(allowed_remote_exmods=[__name__])
    client = oslo.client(target, transport=allowed, timeout=10)
    with pytest.raises(ValueError, match="ival can't go negative"):
        client.call({}, "fail", kind="value")
    with pytest.raises(TimeoutError, match="the disk did not answer"):  # not MessagingTimeout
        client.call({}, "fail", kind="timeout")
    with pytest.raises(Refused) as caught:
        client.call({}, "fail", kind="refused")
    assert caught.value.kwargs == {"host": "h1", "code": 409}
    assert type(caught.value).__name__ == "Refused_Remote"
    strict = oslo.client(target, timeout=10)
    with pytest.raises(oslo_messaging.RemoteError) as remote:
        strict.call({}, "fail", kind="refused")
    assert remote.value.exc_type == "Refused"
    with pytest.raises(oslo_messaging.RemoteError) as missing:
        strict.call({}, "no_such_method")
    assert missing.value.exc_type == "NoSuchMethod"


def test_namespaces_and_versions(oslo: Oslo, topic: str) -> None:
    class V2:
        target = Target(namespace="compute", version="2.3")

        def ping(self, ctxt: Any) -> str:
            return "v2"

    target = Target(topic=topic, server="s1")
    oslo.server(target, [V2()])
    ok = oslo.client(Target(topic=topic, namespace="compute", version="2.1"), timeout=10)
    assert ok.call({}, "ping") == "v2"
    for wrong in (
        Target(topic=topic, namespace="compute", version="2.4"),
        Target(topic=topic, namespace="compute", version="3.0"),
        Target(topic=topic, namespace="network", version="2.0"),
    ):
        with pytest.raises(oslo_messaging.RemoteError) as caught:
            oslo.client(wrong, timeout=10).call({}, "ping")
        assert caught.value.exc_type == "UnsupportedVersion"


def test_fanout_and_direct_to_server(oslo: Oslo, topic: str) -> None:
    got = Recorder()

    class Endpoint:
        def __init__(self, name: str) -> None:
            self.name = name

        def hello(self, ctxt: Any, n: int) -> None:
            got.add((self.name, n))

    # Servers named as cinder names them: host@backend#pool.
    names = ["node1@lvm#pool", "node2@ceph", "node3"]
    for name in names:
        oslo.server(Target(topic=topic, server=name), [Endpoint(name)])
    oslo.client(Target(topic=topic, fanout=True)).cast({}, "hello", n=1)
    assert sorted(got.wait_for(3)) == sorted((name, 1) for name in names)
    oslo.client(Target(topic=topic, server="node1@lvm#pool")).cast({}, "hello", n=2)
    assert got.wait_for(4)[3] == ("node1@lvm#pool", 2)


def test_exchanges_keep_topics_apart(oslo: Oslo, topic: str) -> None:
    class Endpoint:
        def __init__(self, name: str) -> None:
            self.name = name

        def who(self, ctxt: Any) -> str:
            return self.name

    oslo.server(Target(exchange="nova", topic=topic, server="s"), [Endpoint("nova")])
    oslo.server(Target(exchange="cinder", topic=topic, server="s"), [Endpoint("cinder")])
    for exchange in ("nova", "cinder"):
        client = oslo.client(Target(exchange=exchange, topic=topic), timeout=10)
        assert client.call({}, "who") == exchange


def test_retry_gives_message_delivery_failure(conf: Any, broker_url: str, topic: str) -> None:
    scheme = broker_url.split("://", 1)[0]
    # A port nothing listens on; every transport's connect_timeout keeps the test quick.
    oslo = Oslo(conf, f"{scheme}://127.0.0.1:9/?connect_timeout=1")
    try:
        client = oslo.client(Target(topic=topic), retry=2)
        started = time.monotonic()
        with pytest.raises(oslo_messaging.MessageDeliveryFailure, match="3 attempt"):
            client.cast({}, "anything")
        with pytest.raises(oslo_messaging.MessageDeliveryFailure):
            client.call({}, "anything")
        assert time.monotonic() - started < 60
    finally:
        oslo.close()


def test_stop_and_wait_drain(oslo: Oslo, topic: str) -> None:
    """stop() takes no new work and lets what runs finish; wait() returns once it has;
    what the stopped server did not start is run by the other server, once."""
    ran: dict[str, list[str]] = {"a": [], "b": []}
    started = threading.Event()
    lock = threading.Lock()

    class Worker:
        def __init__(self, name: str) -> None:
            self.name = name

        def work(self, ctxt: Any, key: str, seconds: float) -> str:
            if seconds:
                started.set()
            time.sleep(seconds)
            with lock:
                ran[self.name].append(key)
            return self.name

    target = Target(topic=topic)
    server_a = oslo.server(Target(topic=topic, server="a"), [Worker("a")])
    client = oslo.client(target, timeout=30)
    results: list[str] = []
    slow = threading.Thread(
        target=lambda: results.append(client.call({}, "work", key="slow", seconds=1.5))
    )
    slow.start()
    assert started.wait(10)
    oslo.server(Target(topic=topic, server="b"), [Worker("b")])
    casts = [f"c{i}" for i in range(20)]
    for key in casts:
        client.cast({}, "work", key=key, seconds=0)
    began = time.monotonic()
    server_a.stop()
    server_a.wait()
    assert "slow" in ran["a"], "stop() returned before the running call finished"
    assert time.monotonic() - began < 20
    slow.join(10)
    assert results == ["a"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(ran["a"]) + len(ran["b"]) < len(casts) + 1:
        time.sleep(0.05)
    done = sorted(k for k in ran["a"] + ran["b"] if k != "slow")
    assert done == sorted(casts), "a cast was lost or run twice"
    assert client.call({}, "work", key="after", seconds=0) == "b"


def test_restart_after_wait(oslo: Oslo, topic: str) -> None:
    target = Target(topic=topic, server="s1")
    server = oslo.server(target, [Delay()])
    client = oslo.client(target, timeout=10)
    assert client.call({}, "delay", seconds=0) == 0
    server.stop()
    server.wait()
    server.start()
    assert client.call({}, "delay", seconds=0) == 0


def test_notification_pools_priorities_and_requeue(oslo: Oslo, topic: str) -> None:
    seen = Recorder()

    class Endpoint:
        def __init__(self, name: str, requeue_first: bool = False) -> None:
            self.name = name
            self.requeue_first = requeue_first
            self.requeued: set[str] = set()

        def info(self, ctxt: Any, publisher: str, event_type: str, payload: Any, md: Any) -> Any:
            if self.requeue_first and event_type not in self.requeued:
                self.requeued.add(event_type)
                return oslo_messaging.NotificationResult.REQUEUE
            seen.add((self.name, "info", event_type, payload, ctxt))
            return None

        def error(self, ctxt: Any, publisher: str, event_type: str, payload: Any, md: Any) -> None:
            seen.add((self.name, "error", event_type, payload, ctxt))

    targets = [Target(topic=topic)]
    oslo.listener(targets, [Endpoint("pool-a", requeue_first=True)], pool="a", allow_requeue=True)
    oslo.listener(targets, [Endpoint("pool-b")], pool="b")
    notifier = oslo_messaging.Notifier(
        oslo.notification_transport(), "compute.host1", driver="messagingv2", topics=[topic]
    )
    ctxt = oslo_context.RequestContext(
        user_id="u-1", project_id="p-1", request_id="req-1", auth_token="secret"
    )
    notifier.info(ctxt, "instance.create.end", {"id": 1})
    notifier.error(ctxt, "instance.create.error", {"id": 2})
    got = seen.wait_for(4)
    assert sorted((name, prio, kind) for name, prio, kind, _, _ in got) == [
        ("pool-a", "error", "instance.create.error"),
        ("pool-a", "info", "instance.create.end"),
        ("pool-b", "error", "instance.create.error"),
        ("pool-b", "info", "instance.create.end"),
    ]
    # oslo's Notifier sends the redacted context; it arrives as sent, keys and values.
    sent = ctxt.redacted_copy().to_dict()
    assert all(item[4] == sent for item in got)
    assert "secret" not in repr(got)


def test_notifications_wait_for_a_listener(oslo: Oslo, topic: str) -> None:
    notifier = oslo_messaging.Notifier(
        oslo.notification_transport(), "pub", driver="messagingv2", topics=[topic]
    )
    notifier.info({}, "early", {"n": 1})
    seen = Recorder()

    class Endpoint:
        def info(self, ctxt: Any, publisher: str, event_type: str, payload: Any, md: Any) -> None:
            seen.add((event_type, payload, md["message_id"]))

    oslo.listener([Target(topic=topic)], [Endpoint()])
    ((event_type, payload, message_id),) = seen.wait_for(1)
    assert (event_type, payload) == ("early", {"n": 1})
    assert message_id
