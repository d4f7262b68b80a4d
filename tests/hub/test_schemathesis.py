"""Schemathesis against the OpenAPI document with every check (`--checks all`), with tokens
of two tenants: the hub accepts what the document allows and refuses what it does not, never
answers 5xx, and no operation on another tenant's subscription answers with success or its
data.

The hub runs in its own process (schemathesis calls are blocking). Streams are left out:
a stream of an existing subscription never ends by design (tests/hub/test_sse.py and
test_ws.py cover them).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, positive_data_acceptance
from schemathesis.openapi.checks import RejectedPositiveData

from keel.hub import StaticTokens
from keel.hub._openapi import openapi_document
from tests.hub.conftest import TOKENS

schema = schemathesis.openapi.from_dict(openapi_document()).exclude(path_regex=r"/(stream|ws)$")
# No coverage phase: it derives every negative case of every nested schema, and the filter's
# depth limit spelled as eight levels of schemas (Filter1..Filter8) makes that combinatorial:
# collection alone ran past 5 minutes. The examples and fuzzing phases still cover it.
schema.config.phases.update(phases=["examples", "fuzzing"])
# A body past the hub's size limit (which JSON Schema cannot state either) is refused with 413.
schema.config.checks.negative_data_rejection.expected_statuses = [
    *schema.config.checks.negative_data_rejection.expected_statuses,
    "413",
]
# The filter's bounds in all (nodes, characters) that JSON Schema cannot state; the document
# gives them under this extension and the hub's 400 past one names it (`limit`, and a
# `field` under `filters`).
AGGREGATE_LIMITS = openapi_document()["components"]["schemas"]["SubscriptionSpec"][
    "x-keel-aggregate-limits"
]


@schema.auth()
class AliceToken:
    """Alice's token on every case, except where a negative case drops the header on
    purpose (a token passed to `call()` would put it back, and the hub's 401 would then be
    a 200 that the check reads as a schema violation accepted)."""

    def get(self, case: schemathesis.Case, ctx: schemathesis.AuthContext) -> str:
        return "tok-alice"

    def set(self, case: schemathesis.Case, data: str, ctx: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), "X-Auth-Token": data}


def accepted_within_aggregate_limits(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """positive_data_acceptance, except for a 400 that names one of the documented aggregate
    limits: schema-valid filters can add up to more than those."""
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        error = response.json().get("error", {}) if response.status_code == 400 else {}
        field = str(error.get("field", ""))
        if field.startswith("filters") and error.get("limit") in AGGREGATE_LIMITS.values():
            return None
        raise


class Hub:
    url = ""
    bob_sub = ""
    bob_event = "bob-secret-event"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[type[Hub]]:
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    StaticTokens(TOKENS).write(tmp / "tokens.json")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.hub.hub_proc",
            str(tmp / "hub.db"),
            str(tmp / "tokens.json"),
            "0",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(b"READY"), line
        Hub.url = f"http://127.0.0.1:{int(line.split()[1])}"
        with httpx.Client(base_url=Hub.url, timeout=10) as c:
            r = c.post("/v1/subscriptions", json={}, headers={"X-Auth-Token": "tok-bob"})
            Hub.bob_sub = r.json()["id"]
            event = {
                "specversion": "1.0",
                "id": Hub.bob_event,
                "source": "s",
                "type": "t",
                "tenant": "p-two",
            }
            r = c.post("/v1/events", json=event, headers={"X-Auth-Token": "tok-admin"})
            assert r.status_code == 202
        yield Hub
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api(case: schemathesis.Case, hub: type[Hub]) -> None:
    response = case.call(base_url=hub.url, timeout=10)
    case.validate_response(
        response,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[accepted_within_aggregate_limits],
    )
    if "sub_id" in (case.path_parameters or {}):
        case.path_parameters["sub_id"] = hub.bob_sub
        other = case.call(base_url=hub.url, headers={"X-Auth-Token": "tok-alice"}, timeout=10)
        case.validate_response(other, checks=[not_a_server_error])
        assert not 200 <= other.status_code < 300, (case.path, other.status_code, other.text)
        assert hub.bob_event not in other.text
        assert other.status_code != 403
