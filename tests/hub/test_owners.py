"""The owner of each OpenStack payload shape, on the projects' own samples (tests/hub/samples).

Every sample is mapped as if an admin of another project had acted (the context names
``p-admin``): the event must belong to the owner the payload names, and only a payload
that names none falls back to the context's project."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from keel.hub import Hub, from_notification
from keel.wire import RequestContext
from tests.hub.conftest import TOKENS

SAMPLES = Path(__file__).parent / "samples"
NOVA_OWNER = "6f70656e737461636b20342065766572"
NEUTRON_OWNER = "0e33d3b1881045c3ac1b1cb9df3e0477"
GLANCE_OWNER = "5ef70662f8b34079a6eddb8da9d75fe8"
ADMIN = "p-admin"  # the context's project: an admin of another project acted

# (sample, its event type or index, owner, subject): None as owner means the payload names
# none, so the event belongs to the context's project.
CASES: list[tuple[str, Any, str | None, str | None]] = [
    (
        "nova/compute_task-build_instances-error",
        None,
        NOVA_OWNER,
        "d5e6a7b7-80e5-4166-85a3-cd6115201082",
    ),
    (
        "nova/compute_task-migrate_server-error",
        None,
        NOVA_OWNER,
        "d5e6a7b7-80e5-4166-85a3-cd6115201082",
    ),
    (
        "nova/compute_task-rebuild_server-error",
        None,
        NOVA_OWNER,
        "d5e6a7b7-80e5-4166-85a3-cd6115201082",
    ),
    ("nova/instance-create-end", None, NOVA_OWNER, "178b0921-8f85-4257-88b6-2e743b5a975c"),
    ("nova/instance-delete-end", None, NOVA_OWNER, "178b0921-8f85-4257-88b6-2e743b5a975c"),
    ("nova/instance-exists", None, NOVA_OWNER, "178b0921-8f85-4257-88b6-2e743b5a975c"),
    ("nova/server_group-create", None, NOVA_OWNER, "788608ec-ebdc-45c5-bc7f-e5f24ab92c80"),
    ("nova/volume-usage", None, NOVA_OWNER, "a07f71dc-8151-4e7d-a0cc-cd24a3f11113"),
    ("nova/keypair-create-end", None, None, None),
    ("nova/flavor-create", None, None, None),
    ("nova/aggregate-create-end", None, None, "788608ec-ebdc-45c5-bc7f-e5f24ab92c80"),
    ("nova/service-update", None, None, "fa69c544-906b-4a6a-a9c6-c1f7a8078c73"),
    ("keystone", 0, "671da331c47d4e29bb6ea1d270154ec3", "671da331c47d4e29bb6ea1d270154ec3"),
    ("keystone", 1, None, "openstack:1c2fc591-facb-4479-a327-520dade1ea15"),
    ("keystone", 2, "24bdcff1aab8474895dbaac509793de1", "0e6b990380154a2599ce6b6e91548a68"),
    ("keystone", 3, None, "671da331c47d4e29bb6ea1d270154ec3"),
    ("neutron", 0, NEUTRON_OWNER, "42a5e466-2c4e-4c58-b357-8b2459891066"),
    ("neutron", 1, NEUTRON_OWNER, "9eaa96ed-c2d2-45a7-a6d5-5f276a3a1b54"),
    ("neutron", 2, NEUTRON_OWNER, "9eaa96ed-c2d2-45a7-a6d5-5f276a3a1b54"),
    ("neutron", 3, None, "9eaa96ed-c2d2-45a7-a6d5-5f276a3a1b54"),
    ("neutron", 4, NEUTRON_OWNER, "8604a0de-7f6b-409a-a47c-a1cc7bc77b2e"),
    ("glance", 0, GLANCE_OWNER, "1bea47ed-f6a9-463b-b423-14b9cca9ad27"),
    ("glance", 1, GLANCE_OWNER, "1bea47ed-f6a9-463b-b423-14b9cca9ad27"),
    ("glance", 2, GLANCE_OWNER, "b7f1a9b0-2d6e-4d0c-9a55-3c3cfb0b3f5e"),
    ("cinder", 0, NOVA_OWNER, "a07f71dc-8151-4e7d-a0cc-cd24a3f11113"),
    ("cinder", 1, NOVA_OWNER, "a07f71dc-8151-4e7d-a0cc-cd24a3f11113"),
    ("cinder", 2, NOVA_OWNER, "3c1d5e0e-4f4a-4a2b-9d7e-0f1c2b3a4d5e"),
]


def sample(name: str, index: int | None) -> dict[str, Any]:
    path = SAMPLES / f"{name}.json"
    data = json.loads(path.read_text())
    return data if index is None else data[index]


def mapped(n: dict[str, Any], project: str | None = ADMIN) -> Any:
    meta = {"message_id": n.get("message_id", "m-1"), "priority": n["priority"]}
    ctx = RequestContext(project=project) if project else None
    return from_notification(ctx, n["publisher_id"], n["event_type"], n["payload"], meta)


@pytest.mark.parametrize(("name", "index", "owner", "subject"), CASES)
def test_owner_and_subject_of_each_shape(
    name: str, index: int | None, owner: str | None, subject: str | None
) -> None:
    event = mapped(sample(name, index))
    assert event.tenant == (owner or ADMIN)
    assert event.subject == subject
    if owner is None:  # no owner and no context project: admins' all_projects only
        assert mapped(sample(name, index), project=None).tenant is None


async def test_a_compute_task_error_reaches_its_owner_not_the_acting_admin(hub: Hub) -> None:
    owner = TOKENS["tok-alice"].__class__("u", NOVA_OWNER, ("member",))
    admin = TOKENS["tok-admin"]
    owner_sub = await hub.create_subscription(owner, {"types": ["compute_task.*"]})
    admin_sub = await hub.create_subscription(admin, {})
    await hub.ingest(mapped(sample("nova/compute_task-build_instances-error", None)))
    _, got = await hub.read(owner, owner_sub.id, after=0, limit=None)
    assert [json.loads(bytes(m.event))["type"] for m in got] == [
        "compute_task.build_instances.error"
    ]
    _, leaked = await hub.read(admin, admin_sub.id, after=0, limit=None)
    assert leaked == []
