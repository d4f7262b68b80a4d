"""Subscription filters: pure functions from a JSON spec to a predicate over event attributes.

A spec is the body of a subscription (``types``, ``source``, ``subject``, ``priority``,
``filters``); `compile_filter` checks it completely before anything is stored and raises
`InvalidFilter` naming the offending part, so a stored filter never fails at match time.
The ``filters`` entries are the CloudEvents Subscriptions API dialects (exact, prefix, suffix,
all, any, not); ``sql`` is refused. A condition on an attribute the event lacks is false.
No I/O here.

Cost: any tenant writes these, and every event of its project is matched against them on the
hub's one event loop, so matching is linear in the event's attributes whatever the spec. Type
patterns are globs matched without regular expressions (`Glob`: a prefix, a suffix and the
literal pieces between stars found left to right, each at most once), and a spec is bounded:
at most `MAX_PATTERNS` type patterns of `MAX_PATTERN` characters, `MAX_NODES` filter nodes
`MAX_DEPTH` deep, and `MAX_SPEC_CHARS` characters of strings in all.
"""

from __future__ import annotations

import json
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
MAX_PATTERNS = 100
MAX_PATTERN = 256
MAX_STRING = 1024
MAX_SPEC_CHARS = 4096


class Glob:
    """``*`` matches any run of characters (dots included); everything else is literal.

    Matching is one left-to-right scan: a run of stars is one star, and the pieces between
    stars are found with ``str.find`` from where the previous one ended. Taking the leftmost
    occurrence of each piece never loses a match (whatever a later piece needs lies to the
    right of it), so there is no backtracking and no regular expression built from input."""

    __slots__ = ("exact", "middle", "minimum", "prefix", "suffix")

    def __init__(self, pattern: str) -> None:
        parts = pattern.split("*")
        self.exact = pattern if len(parts) == 1 else None
        self.prefix = parts[0]
        self.suffix = parts[-1] if len(parts) > 1 else ""
        self.middle = tuple(p for p in parts[1:-1] if p)
        self.minimum = len(self.prefix) + len(self.suffix) + sum(map(len, self.middle))

    def match(self, text: str) -> bool:
        if self.exact is not None:
            return text == self.exact
        if len(text) < self.minimum or not text.startswith(self.prefix):
            return False
        end = len(text) - len(self.suffix)
        if not text.endswith(self.suffix):
            return False
        pos = len(self.prefix)
        for piece in self.middle:
            found = text.find(piece, pos, end)
            if found < 0:
                return False
            pos = found + len(piece)
        return True


def compile_filter(spec: Mapping[str, Any]) -> Predicate:
    """The predicate for a subscription spec (all conditions must hold)."""
    _budget_chars(spec)
    parts: list[Predicate] = []
    types = spec.get("types")
    if types is not None:
        globs = [Glob(_pattern(t, f"types[{i}]")) for i, t in enumerate(_strings(types, "types"))]
        exact = frozenset(g.exact for g in globs if g.exact is not None)
        wild = tuple(g for g in globs if g.exact is None)
        if not wild:
            parts.append(lambda a: a.get("type") in exact)
        else:
            parts.append(
                lambda a: (
                    "type" in a and (a["type"] in exact or any(g.match(a["type"]) for g in wild))
                )
            )
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


def _distinct(nodes: list[Any], parts: list[Predicate]) -> list[Predicate]:
    """``parts`` without the repeats of a node: a tenant's filter listing one test twenty
    times would otherwise cost twenty calls on every event routed (the nodes are already
    validated, so they encode)."""
    seen: set[str] = set()
    out: list[Predicate] = []
    for node, part in zip(nodes, parts, strict=True):
        key = json.dumps(node, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(part)
    return out


def _any_of(nodes: list[Any], parts: list[Predicate]) -> Predicate:
    """`_any`, with the one-attribute prefix tests on one attribute merged into a single
    `str.startswith` of a tuple: one C call per event however many prefixes are listed."""
    prefixes: dict[str, list[str]] = {}
    rest_nodes: list[Any] = []
    rest: list[Predicate] = []
    for node, part in zip(nodes, parts, strict=True):
        arg = node.get("prefix")
        if isinstance(arg, dict) and len(arg) == 1:
            ((key, value),) = arg.items()
            if value not in prefixes.setdefault(key, []):
                prefixes[key].append(value)
        else:
            rest_nodes.append(node)
            rest.append(part)
    merged = _distinct(rest_nodes, rest)
    for key, values in prefixes.items():
        merged.append(_prefixes(key, tuple(values)))
    return _any(merged)


def _prefixes(key: str, values: tuple[str, ...]) -> Predicate:
    return lambda a: key in a and a[key].startswith(values)


def _dialect(node: Any, where: str, depth: int, budget: list[int]) -> Predicate:
    budget[0] -= 1
    if budget[0] < 0:
        raise InvalidFilter(f"filter has more than {MAX_NODES} nodes", field=where, limit=MAX_NODES)
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
        return _all(_distinct(arg, subs)) if dialect == "all" else _any_of(arg, subs)
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
    if len(value) > MAX_STRING:
        raise InvalidFilter(f"{where} is longer than {MAX_STRING} characters", field=where)
    return value


def _pattern(value: str, where: str) -> str:
    if len(value) > MAX_PATTERN:
        raise InvalidFilter(f"{where} is longer than {MAX_PATTERN} characters", field=where)
    return value


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > MAX_PATTERNS:
        raise InvalidFilter(f"{where} must be a list of 1 to {MAX_PATTERNS} strings", field=where)
    return [_string(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _budget_chars(spec: Mapping[str, Any]) -> None:
    """Refuse a spec whose strings add up past `MAX_SPEC_CHARS` (counted without recursion:
    the structure is checked for depth and shape afterwards)."""
    total = 0
    stack: list[Any] = [spec]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > 4 * MAX_NODES + 2 * MAX_PATTERNS + 16:
            raise InvalidFilter(
                f"filter has more than {MAX_NODES} nodes", field="filters", limit=MAX_NODES
            )
        if isinstance(node, str):
            total += len(node)
        elif isinstance(node, Mapping):
            for key, value in node.items():
                total += len(key) if isinstance(key, str) else 0
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
        if total > MAX_SPEC_CHARS:
            raise InvalidFilter(
                f"the filter's strings add up to more than {MAX_SPEC_CHARS} characters",
                field="filters",
                limit=MAX_SPEC_CHARS,
            )


def index_key(spec: Mapping[str, Any]) -> tuple[str, str] | None:
    """An (attribute, value) every matching event must carry, if the spec requires one: its
    ``source`` or ``subject``, or a top-level ``exact`` filter (top-level filters all hold).
    The hub routes by it, so an event is matched only against the subscriptions that can
    want it (call only on a spec `compile_filter` accepted)."""
    for name in ("subject", "source"):
        value = spec.get(name)
        if isinstance(value, str):
            return name, value
    for node in spec.get("filters") or ():
        if isinstance(node, dict) and isinstance(exact := node.get("exact"), dict) and exact:
            name, value = next(iter(exact.items()))
            return str(name), str(value)
    return None
