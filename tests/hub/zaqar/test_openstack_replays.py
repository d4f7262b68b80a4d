"""The calls Heat and Mistral make to Zaqar, replayed with python-zaqarclient as they make
them (read from their code: heat/engine/clients/os/zaqar.py, signal_responder.py,
server_base.py; os-collect-config's zaqar collector; mistral-extra's ZaqarAction)."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
from zaqarclient.transport import errors as zerrors

from tests.hub.receiver import Receiver
from tests.hub.zaqar.conftest import Member, Zaqar, sync

HEAT_DEFAULT_TTL = 3600  # ZaqarClientPlugin.DEFAULT_TTL


async def test_heat_software_deployment_over_zaqar(zq: Zaqar, alice: Member) -> None:
    token = await alice.token()

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        heat = zq.heat(alice, token)  # create_for_tenant(stack_user_project_id, token)
        # server_base: the metadata queue, and the signed URL the server gets.
        meta_queue = heat.queue("server-1-metadata")
        signed = meta_queue.signed_url(["messages"], methods=["GET", "DELETE"])
        meta_queue.post({"body": {"deployments": [{"id": "d1"}]}, "ttl": HEAT_DEFAULT_TTL})
        # On the server: a client from the signed URL, then pop (os-collect-config).
        agent = zq.signed(signed)
        out["collected"] = next(agent.queue("server-1-metadata").pop()).body
        # The server signals its deployment back on the signal queue (heat-config-notify).
        heat.queue("deployment-d1-signal").post(
            {"body": {"deploy_status_code": 0, "deploy_stdout": "ok"}, "ttl": 600}
        )
        # signal_responder._service_zaqar_signal: pop what arrived.
        out["signals"] = [m.body for m in heat.queue("deployment-d1-signal").pop()]
        out["again"] = list(heat.queue("deployment-d1-signal").pop())
        # ZaqarEventSink.consume: the stack's events into a user's queue.
        sink = heat.queue("stack-events", auto_create=False)
        sink.post({"body": {"resource_status": "CREATE_COMPLETE"}, "ttl": HEAT_DEFAULT_TTL})
        out["events"] = [m.body for m in heat.queue("stack-events").messages(echo=True)]
        # _delete_zaqar_signal_queue / server_base delete, ignoring not found.
        for name in ("deployment-d1-signal", "server-1-metadata", "never-made"):
            with contextlib.suppress(zerrors.ResourceNotFound):
                heat.queue(name).delete()
        out["left"] = sorted(q.name for q in heat.queues()[0])
        return out

    out = await sync(run)
    assert out["collected"] == {"deployments": [{"id": "d1"}]}
    assert out["signals"] == [{"deploy_status_code": 0, "deploy_stdout": "ok"}]
    assert out["again"] == []
    assert out["events"] == [{"resource_status": "CREATE_COMPLETE"}]
    assert out["left"] == ["stack-events"]


async def test_heat_zaqar_subscription_and_mistral_trigger(zq: Zaqar, alice: Member) -> None:
    heat = zq.heat(alice, await alice.token())
    async with Receiver(lambda n, h, b: 200) as rx:
        # OS::Zaqar::MistralTrigger: a subscription whose post_data wraps the message.
        options = {
            "post_data": '{"workflow_id": "wf-1", "params": {"env": {"notification": '
            '"$zaqar_message$"}}, "input": {}}'
        }

        def create() -> str:
            sub = heat.subscription(
                "triggers", subscriber=rx.url, ttl=220367260800, options=options
            )
            heat.queue("triggers").post({"body": {"alarm": "high"}, "ttl": 600})
            return str(sub.id)

        sub_id = await sync(create)
        await rx.wait_for(1)
        sent = msgspec.json.decode(rx.requests[0].body)
        assert sent["workflow_id"] == "wf-1"
        assert sent["params"]["env"]["notification"]["body"] == {"alarm": "high"}
        # handle_update, then handle_delete with ignore_not_found.
        await sync(
            lambda: heat.subscription("triggers", id=sub_id, auto_create=False).update(
                {"subscriber": rx.url, "ttl": 3600, "options": {}}
            )
        )
        await sync(lambda: heat.subscription("triggers", id=sub_id, auto_create=False).delete())
        assert await sync(lambda: list(heat.subscriptions("triggers"))) == []


async def test_mistral_zaqar_actions(zq: Zaqar, alice: Member) -> None:
    def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        client = zq.mistral(alice)  # ZaqarAction._create_client: a session, no project header
        # zaqar.queue_post
        out["posted"] = client.queue("jobs").post(
            [{"body": {"job": n}, "ttl": 300} for n in range(4)]
        )
        # zaqar.queue_messages
        out["listed"] = [m.body for m in client.queue("jobs").messages(echo=True, limit=10)]
        # zaqar.claim_messages, then each claimed message deleted by its claim id
        claim = client.queue("jobs").claim(ttl=120, grace=60, limit=2)
        claimed = list(claim)
        out["claimed"] = [m.body for m in claimed]
        for m in claimed:
            assert m.claim_id == claim.id
            m.delete()
        # zaqar.queue_pop
        out["popped"] = [m.body for m in client.queue("jobs").pop(1)]
        # zaqar.delete_messages
        rest = [m.id for m in client.queue("jobs").messages(echo=True)]
        client.queue("jobs").delete_messages(*rest)
        out["empty"] = list(client.queue("jobs").messages(echo=True))
        return out

    out = await sync(run)
    assert len(out["posted"]["resources"]) == 4
    assert out["listed"] == [{"job": n} for n in range(4)]
    assert out["claimed"] == [{"job": 0}, {"job": 1}]
    assert out["popped"] == [{"job": 2}]
    assert out["empty"] == []
