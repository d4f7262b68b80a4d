"""Who owns an OpenStack notification, per payload shape, written as data. Pure, no I/O.

Each `Rule` names the event types it covers (globs, as subscriptions write them) and the
paths, tried in order, where that shape keeps its owner's project and its subject. The first
rule whose types match decides; `GENERIC` covers every other shape. A path is a tuple of keys
from the payload down; ``"{resource}"`` stands for each of the first two words of the event
type (Neutron's ``{"port": {...}}`` for ``port.update.end``).

The context of a notification is the caller's, never the owner's: an admin of another
project who deletes a tenant's server sends the admin's project. So the owner comes from the
payload; only when no path of the shape yields one does the event belong to the context's
project (a caller acting on its own resources; only admins act on others'), and with no
context project either, to nobody: then only admins' ``all_projects`` subscriptions see it.

The shapes, from each project's published notifications (tests/hub/samples/):

- Nova versioned payloads keep the owner at ``nova_object.data.tenant_id`` (instances) or
  ``project_id`` (server groups, request specs); ``compute_task.*`` names it only inside
  ``nova_object.data.request_spec.nova_object.data.project_id``. Flavors, aggregates,
  keypairs (a user's, not a project's) and services belong to no project.
- Legacy payloads (Nova ``compute.instance.*``, Cinder ``volume.*`` and ``snapshot.*``) carry
  ``tenant_id`` / ``project_id`` at the top.
- Glance: an image's ``owner``; ``image.send`` has ``owner_id`` (and the receiver's
  ``receiver_tenant_id``, which does not own it); tasks have ``owner``.
- Keystone: ``identity.project.*`` is about the project in ``resource_info``, which owns it;
  a role assignment's ``project``; other identity events (users, roles, domains,
  authentication) belong to no project.
- Neutron: the resource dict's ``project_id`` / ``tenant_id``; ``router.interface.*`` keeps
  it in ``router_interface``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keel.hub._filters import Glob

Path = tuple[str, ...]
RESOURCE = "{resource}"
_NOVA = "nova_object.data"
_PROJECT_KEYS = ("project_id", "tenant_id")


@dataclass(frozen=True)
class Rule:
    types: tuple[str, ...]
    owner: tuple[Path, ...]
    subject: tuple[Path, ...] = ()


def _keys(prefix: Path, keys: Sequence[str]) -> tuple[Path, ...]:
    return tuple((*prefix, key) for key in keys)


GENERIC = Rule(
    types=("*",),
    owner=(
        *_keys((), _PROJECT_KEYS),
        *_keys((RESOURCE,), _PROJECT_KEYS),
        *_keys((_NOVA,), _PROJECT_KEYS),
    ),
)

RULES: tuple[Rule, ...] = (
    Rule(
        types=("compute_task.*",),
        owner=((_NOVA, "request_spec", _NOVA, "project_id"),),
        subject=((_NOVA, "instance_uuid"),),
    ),
    Rule(
        types=("flavor.*", "aggregate.*", "keypair.*", "service.*", "metrics.*"),
        owner=(),
    ),
    Rule(types=("image.send",), owner=(("owner_id",),), subject=(("image_id",),)),
    Rule(types=("image.*", "task.*"), owner=(("owner",),)),
    Rule(types=("identity.project.*",), owner=(("resource_info",),), subject=(("resource_info",),)),
    Rule(types=("identity.role_assignment.*",), owner=(("project",),), subject=(("role",),)),
    Rule(types=("identity.*",), owner=(), subject=(("resource_info",), ("target", "id"))),
    Rule(
        types=("router.interface.*",),
        owner=_keys(("router_interface",), _PROJECT_KEYS),
        subject=(("router_interface", "id"),),
    ),
)

_COMPILED = [(tuple(Glob(t) for t in rule.types), rule) for rule in RULES]


def rule_for(event_type: str) -> Rule:
    for globs, rule in _COMPILED:
        if any(g.match(event_type) for g in globs):
            return rule
    return GENERIC


def _resolve(payload: Any, path: Path, words: Sequence[str]) -> list[str]:
    """Every string at ``path`` (one per resource word where the path names the resource)."""
    nodes: list[Any] = [payload]
    for key in path:
        keys = words if key == RESOURCE else (key,)
        nodes = [n[k] for n in nodes if isinstance(n, Mapping) for k in keys if k in n]
    return [n for n in nodes if isinstance(n, str) and n]


def first(payload: Any, paths: Sequence[Path], words: Sequence[str]) -> str | None:
    for path in paths:
        found = _resolve(payload, path, words)
        if found:
            return found[0]
    return None


def owner(event_type: str, payload: Any) -> str | None:
    """The project that owns the notification's resource, as its payload names it."""
    return first(payload, rule_for(event_type).owner, event_type.split(".")[:2])
