"""Moving a running cloud from oslo's rabbit:// to keel+rabbit://, service by service.

Four services, each an RPC server and a client, at each stage of docs/openstack.md's
procedure at once: still on ``rabbit://``, phase 1 (``?legacy=send``), phase 2
(``?legacy=listen``) and done (plain ``keel+rabbit://``). Every pair that can meet during
the procedure must reach each other; notifications cross between the two drivers as they
are.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.oslo import oslo_messaging
from tests.oslo_driver.support import Oslo, Recorder
from tests.servers import server_url

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # oslo's executor= argument
]

STAGES = ("rabbit", "phase1", "phase2", "keel")
# Who meets whom: during phase 1 nobody is done yet, during phase 3 nobody is on rabbit://.
MEET = {
    "rabbit": ("rabbit", "phase1"),
    "phase1": ("rabbit", "phase1", "phase2"),
    "phase2": ("phase1", "phase2", "keel"),
    "keel": ("phase2", "keel"),
}


class Service:
    def __init__(self, name: str) -> None:
        self.name = name

    def whoami(self, ctxt: Any, caller: str) -> str:
        return f"{self.name} for {caller}"


@pytest.fixture
def cloud(conf: Any) -> Iterator[dict[str, Oslo]]:
    rabbit = server_url("rabbitmq")
    urls = {
        "rabbit": rabbit,
        "phase1": f"keel+{rabbit}?legacy=send",
        "phase2": f"keel+{rabbit}?legacy=listen",
        "keel": f"keel+{rabbit}",
    }
    services = {stage: Oslo(conf, url) for stage, url in urls.items()}
    yield services
    for service in services.values():
        service.close()


def test_every_stage_reaches_the_stages_it_meets(cloud: dict[str, Oslo]) -> None:
    run = uuid.uuid4().hex[:8]
    for stage, service in cloud.items():
        service.server(
            oslo_messaging.Target(topic=f"{stage}-{run}", server=f"{stage}-host"),
            [Service(stage)],
        )
    for caller, service in cloud.items():
        for callee in MEET[caller]:
            client = service.client(oslo_messaging.Target(topic=f"{callee}-{run}"), timeout=15)
            assert client.call({}, "whoami", caller=caller) == f"{callee} for {caller}"


def test_notifications_cross_between_the_drivers(cloud: dict[str, Oslo]) -> None:
    topic = f"notifications-{uuid.uuid4().hex[:8]}"
    seen = {stage: Recorder() for stage in ("rabbit", "keel")}

    class Sink:
        def __init__(self, stage: str) -> None:
            self.stage = stage

        def info(self, ctxt: Any, publisher: str, event_type: str, payload: Any, md: Any) -> None:
            seen[self.stage].add((publisher, event_type, payload))

    for stage in seen:
        cloud[stage].listener([oslo_messaging.Target(topic=topic)], [Sink(stage)], pool=stage)
    for stage in seen:
        notifier = oslo_messaging.Notifier(
            cloud[stage].notification_transport(), stage, driver="messagingv2", topics=[topic]
        )
        notifier.info({}, "compute.instance.update", {"from": stage})
    expected = sorted((stage, "compute.instance.update", {"from": stage}) for stage in seen)
    for recorder in seen.values():
        assert sorted(recorder.wait_for(2), key=str) == sorted(expected, key=str)
