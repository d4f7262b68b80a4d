"""The hub's Zaqar API as the plugin uses it (standard library only: it runs in Horizon's
process, whatever that has installed)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

QUEUE = "keel-horizon-live"


class HubError(Exception):
    """The hub refused or could not be reached."""


def _call(method: str, url: str, token: str, body: Any) -> Any:
    request = urllib.request.Request(
        url,
        method=method,
        data=json.dumps(body).encode(),
        headers={
            "X-Auth-Token": token,
            "Client-ID": str(uuid.uuid4()),
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            raw = answer.read()
    except urllib.error.HTTPError as exc:
        raise HubError(f"{method} {url}: {exc.code} {exc.read()[:200]!r}") from None
    except OSError as exc:
        raise HubError(f"{method} {url}: {exc}") from None
    return json.loads(raw) if raw else None


def stream_url(*, internal: str, public: str, token: str, lifetime: int) -> str:
    """The browser's URL of the project's stream: the queue made (every event of the
    project) if missing, then signed for GET on its messages until ``lifetime`` from now."""
    queue = f"{internal.rstrip('/')}/v2/queues/{QUEUE}"
    _call("PUT", queue, token, {"_keel_filter": {}})
    expires = datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=lifetime)
    signed = _call(
        "POST",
        queue + "/share",
        token,
        {"paths": ["messages"], "methods": ["GET"], "expires": expires.isoformat()},
    )
    query = urlencode(
        {
            "signature": signed["signature"],
            "expires": signed["expires"],
            "paths": ",".join(signed["paths"]),
            "methods": ",".join(signed["methods"]),
            "project_id": signed["project"],
        }
    )
    return f"{public.rstrip('/')}/v2/queues/{QUEUE}/messages?{query}"
