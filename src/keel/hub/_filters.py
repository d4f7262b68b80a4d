"""Subscription filters: pure functions from a JSON spec to a predicate over event attributes.

A spec is the body of a subscription (``types``, ``source``, ``subject``, ``priority``,
``filters``); `compile_filter` checks it completely before anything is stored and raises
`InvalidFilter` naming the offending part, so a stored filter never fails at match time.
The ``filters`` entries are the CloudEvents Subscriptions API dialects (exact, prefix, suffix,
all, any, not); ``sql`` is refused. A condition on an attribute the event lacks is false.
No I/O here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from keel.errors import InvalidFilter

Attributes = Mapping[str, str]
Predicate = Callable[[Attributes], bool]

SPEC_FIELDS = ("types", "source", "subject", "priority", "filters")
_ATTRIBUTE = re.compile(r"^[a-z0-9]{1,20}$")
MAX_DEPTH = 8
MAX_NODES = 100


def wildcard(pattern: str) -> re.Pattern[str]:
    """``*`` matches any run of characters (dots included); everything else is literal."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def compile_filter(spec: Mapping[str, Any]) -> Predicate:
    """The predicate for a subscription spec (all conditions must hold)."""
    parts: list[Predicate] = []
    types = spec.get("types")
    if types is not None:
        patterns = [wildcard(t) for t in _strings(types, "types")]
        parts.append(lambda a: "type" in a and any(p.fullmatch(a["type"]) for p in patterns))
    for name in ("source", "subject"):
        value = spec.get(name)
        if value is not None:
            parts.append(_exact({name: _string(value, name)}, name))
    priority = spec.get("priority")
    if priority is not None:
        wanted = frozenset(
            _strings([priority] if isinstance(priority, str) else priority, "priority")
        )
        parts.append(lambda a: a.get("priority") in wanted)
    filters = spec.get("filters")
    if filters is not None:
        if not isinstance(filters, list):
            raise InvalidFilter("filters must be a list of filter objects", field="filters")
        budget = [MAX_NODES]
        parts.extend(_dialect(f, f"filters[{i}]", 1, budget) for i, f in enumerate(filters))
    return _all(parts)


# Single-part shapes get their own closures: routing calls a predicate per subscription per
# event, so one call instead of three nested ones is most of the ingest rate.


def _all(parts: list[Predicate]) -> Predicate:
    if not parts:
        return lambda a: True
    if len(parts) == 1:
        return parts[0]
    return lambda a: all(p(a) for p in parts)


def _any(parts: list[Predicate]) -> Predicate:
    if len(parts) == 1:
        return parts[0]
    return lambda a: any(p(a) for p in parts)


def _dialect(node: Any, where: str, depth: int, budget: list[int]) -> Predicate:
    budget[0] -= 1
    if budget[0] < 0:
        raise InvalidFilter(f"filter has more than {MAX_NODES} nodes", field=where)
    if depth > MAX_DEPTH:
        raise InvalidFilter(f"{where}: filters nest deeper than {MAX_DEPTH}", field=where)
    if not isinstance(node, dict) or len(node) != 1:
        raise InvalidFilter(
            f"{where} must be an object with exactly one dialect "
            "(exact, prefix, suffix, all, any, not)",
            field=where,
        )
    ((dialect, arg),) = node.items()
    here = f"{where}.{dialect}"
    if dialect in ("exact", "prefix", "suffix"):
        if not isinstance(arg, dict) or not arg:
            raise InvalidFilter(f"{here} must map attribute names to strings", field=here)
        pairs = {_attribute(k, here): _string(v, f"{here}.{k}") for k, v in arg.items()}
        return {"exact": _exact, "prefix": _prefix, "suffix": _suffix}[dialect](pairs, here)
    if dialect in ("all", "any"):
        if not isinstance(arg, list):
            raise InvalidFilter(f"{here} must be a list of filters", field=here)
        subs = [_dialect(s, f"{here}[{i}]", depth + 1, budget) for i, s in enumerate(arg)]
        return _all(subs) if dialect == "all" else _any(subs)
    if dialect == "not":
        inner = _dialect(arg, here, depth + 1, budget)
        return lambda a: not inner(a)
    if dialect == "sql":
        raise InvalidFilter(
            f"{here}: the sql dialect is not supported; use exact, prefix, suffix, all, any or not",
            field=here,
        )
    raise InvalidFilter(
        f"{where}: unknown dialect {dialect!r} (exact, prefix, suffix, all, any, not)",
        field=where,
    )


def _exact(pairs: dict[str, str], where: str) -> Predicate:
    items = tuple(pairs.items())
    if len(items) == 1:
        ((key, value),) = items
        return lambda a: a.get(key) == value  # a missing attribute is None, never equal
    return lambda a: all(k in a and a[k] == v for k, v in items)


def _prefix(pairs: dict[str, str], where: str) -> Predicate:
    items = tuple(pairs.items())
    return lambda a: all(k in a and a[k].startswith(v) for k, v in items)


def _suffix(pairs: dict[str, str], where: str) -> Predicate:
    items = tuple(pairs.items())
    return lambda a: all(k in a and a[k].endswith(v) for k, v in items)


def _attribute(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _ATTRIBUTE.match(name):
        raise InvalidFilter(
            f"{where}: attribute name {name!r} must be 1-20 lowercase letters or digits",
            field=where,
        )
    return name


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidFilter(f"{where} must be a string, not {type(value).__name__}", field=where)
    if len(value) > 1024:
        raise InvalidFilter(f"{where} is longer than 1024 characters", field=where)
    return value


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > 100:
        raise InvalidFilter(f"{where} must be a list of 1 to 100 strings", field=where)
    return [_string(v, f"{where}[{i}]") for i, v in enumerate(value)]
