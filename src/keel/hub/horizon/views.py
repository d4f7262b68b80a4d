"""The one view: the signed stream URL for the user's project (made with the user's own
token, server side, once per project and URL lifetime)."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest, JsonResponse

from keel.hub.horizon import _hub

log = logging.getLogger("keel.hub.horizon")


def stream(request: HttpRequest) -> JsonResponse:
    user: Any = request.user
    project = user.project_id
    key = f"keel-live-stream-{project}"
    url = cache.get(key)
    if url is None:
        base = getattr(settings, "KEEL_HUB_URL", None)
        if not base:
            return JsonResponse({"stream": None, "error": "KEEL_HUB_URL is not set"})
        lifetime = int(getattr(settings, "KEEL_LIVE_URL_LIFETIME", 3600))
        try:
            url = _hub.stream_url(
                internal=getattr(settings, "KEEL_HUB_INTERNAL_URL", None) or base,
                public=base,
                token=user.token.id,
                lifetime=lifetime,
            )
        except _hub.HubError as exc:
            log.warning("keel live stream unavailable: %s", exc)
            return JsonResponse({"stream": None, "error": str(exc)})
        cache.set(key, url, max(60, lifetime - 300))
    return JsonResponse({"stream": url})
