"""A fake server stood up from another service's interface spec, for testing in isolation.

It serves the spec's topic with one method per spec method. Each call is checked against the
spec (unknown or missing arguments and wrong types are `InvalidArguments`; methods the spec
lacks are `UnknownMethod`), and answered from ``responses`` (a value, or a function of the
arguments) or else from the first example the spec carries. A test of a service that calls a
method its neighbours do not offer therefore fails, as it would against the real neighbour.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from keel.errors import InvalidArguments
from keel.messaging import RequestContext, RPCServer, Target, Transport

_BASIC: dict[str, Any] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "bytes": bytes,
    "None": None,
    "NoneType": None,
    "list": list,
    "dict": dict,
    "any": Any,
    "typing.Any": Any,
}


def parse_type(text: str) -> Any:
    """A spec's type text to a type msgspec can check; unknown names check nothing."""
    text = text.strip()
    if "|" in text:
        parts = [parse_type(part) for part in _split(text, "|")]
        result: Any = parts[0]
        for part in parts[1:]:
            result = result | (type(None) if part is None else part)
        return result
    if text.endswith("]") and "[" in text:
        head, _, inner = text[:-1].partition("[")
        args = [parse_type(a) for a in _split(inner, ",")]
        if head in ("list", "typing.List"):
            return list[args[0]]  # type: ignore[valid-type]
        if head in ("dict", "typing.Dict") and len(args) == 2:
            return dict[args[0], args[1]]  # type: ignore[valid-type]
        return Any
    return _BASIC.get(text, Any)


def _split(text: str, sep: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


Responses = dict[str, Any | Callable[..., Any]]


def _handler(
    name: str, spec: dict[str, Any], responses: Responses, calls: list[tuple[str, dict[str, Any]]]
) -> Callable[..., Any]:
    params = {p["name"]: p for p in spec["params"]}
    types = {n: parse_type(p["type"]) for n, p in params.items()}

    async def handle(ctx: RequestContext, **kwargs: Any) -> Any:
        unknown = sorted(kwargs.keys() - params.keys())
        if unknown:
            raise InvalidArguments(f"{name}() has no parameter {', '.join(unknown)} in the spec")
        missing = sorted(n for n, p in params.items() if p["required"] and n not in kwargs)
        if missing:
            raise InvalidArguments(f"{name}() is missing {', '.join(missing)}")
        for key, value in kwargs.items():
            try:
                msgspec.convert(
                    value, types[key] if types[key] is not None else type(None), strict=True
                )
            except msgspec.ValidationError as exc:
                raise InvalidArguments(
                    f"{name}({key}): {exc} (spec says {params[key]['type']})"
                ) from None
        calls.append((name, kwargs))
        if name in responses:
            answer = responses[name]
            return answer(**kwargs) if callable(answer) else answer
        examples = spec.get("examples") or []
        return examples[0].get("result") if examples else None

    handle.__name__ = name
    return handle


class FakeServer:
    """Serves ``spec`` on ``topic`` (default: the spec's endpoint name) over ``transport``."""

    def __init__(
        self,
        transport: Transport,
        spec: dict[str, Any],
        *,
        topic: str,
        responses: Responses | None = None,
    ) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        endpoint = type("Fake", (), {})()
        endpoint.target = Target(namespace=spec.get("namespace"), version=spec["version"])
        for name, method in spec["methods"].items():
            setattr(endpoint, name, _handler(name, method, responses or {}, self.calls))
        self.server = RPCServer(transport, Target(topic), [endpoint], service=f"fake-{topic}")

    async def __aenter__(self) -> FakeServer:
        await self.server.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.server.stop()


__all__ = ["FakeServer"]
