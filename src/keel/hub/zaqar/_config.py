"""The Zaqar face's settings: Zaqar's own option names and defaults (its ``[transport]``,
``[notification]`` and ``[signed_url]`` groups), plus the Keel ones it needs."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ZaqarConfig:
    # [signed_url] secret_key: every hub process sharing a store needs the same one, else a
    # URL signed by one is refused by another; the default lives as long as the process.
    secret_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    # [notification] require_confirmation: subscribers get nothing until they confirm.
    require_confirmation: bool = False
    # Where subscribers reach this API (the confirmation notice's WSGISubscribeURL).
    public_url: str | None = None
    # [transport]
    default_message_ttl: int = 3600
    max_message_ttl: int = 1_209_600
    max_message_delay: int = 900
    default_claim_ttl: int = 300
    default_claim_grace: int = 60
    max_claim_ttl: int = 43_200
    max_claim_grace: int = 43_200
    default_subscription_ttl: int = 3600
    max_queues_per_page: int = 20
    max_messages_per_page: int = 20
    max_subscriptions_per_page: int = 20
    max_messages_per_claim_or_pop: int = 20
    max_queue_metadata: int = 64 * 1024
    max_messages_post_size: int = 256 * 1024
    message_delete_with_claim_id: bool = False
    # Keel: a Zaqar queue is a hub queue with a length bound; past it the oldest messages are
    # dropped (and counted), where Zaqar's own queues grow without one.
    queue_max_messages: int = 100_000
