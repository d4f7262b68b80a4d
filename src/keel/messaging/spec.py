"""Interface specs: an endpoint's RPC interface as JSON, and the breaking changes between two.

`export_spec` reads an endpoint class: its namespace and version, each public method's
parameters (names, types from annotations, defaults) and return type, and the version a
method appeared in. `diff_specs` compares two specs and reports what would break callers:

* breaking (needs a major bump): a method removed; a parameter removed, renamed, made
  required, or of another type; a required parameter added; a return type changed;
* needs a minor bump: a method or an optional parameter added under the same version;
* wrong: the version went down.

Breaking changes under a major bump are reported as allowed. CI gates on `Diff.failed`.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keel.errors import ConfigError
from keel.messaging._endpoints import RemoteOptions
from keel.messaging._target import Target, parse_version

SPEC_VERSION = 1


def _type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return "any"
    if isinstance(annotation, str):
        return annotation
    return inspect.formatannotation(annotation)


def load(ref: str) -> type:
    """``module:Class`` to the class (what `keel spec export` takes)."""
    module_name, _, name = ref.partition(":")
    if not name:
        raise ConfigError(f"{ref!r}: expected MODULE:Class, e.g. myservice.rpc:ComputeAPI")
    try:
        obj = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load {ref!r}: {exc}") from None
    if not isinstance(obj, type):
        raise ConfigError(f"{ref!r} is not a class")
    return obj


def export_spec(endpoint: type) -> dict[str, Any]:
    target = getattr(endpoint, "target", None) or Target()
    methods: dict[str, Any] = {}
    for name, func in inspect.getmembers(endpoint, inspect.isfunction):
        if name.startswith("_"):
            continue
        try:
            hints = typing.get_type_hints(func)
        except Exception:
            hints = {}
        params = []
        for index, param in enumerate(inspect.signature(func).parameters.values()):
            if index < 2:  # self and the request context
                continue
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            params.append(
                {
                    "name": param.name,
                    "type": _type_name(hints.get(param.name, param.annotation)),
                    "required": param.default is inspect.Parameter.empty,
                }
            )
        options: RemoteOptions = getattr(func, "__keel_remote__", RemoteOptions())
        methods[name] = {
            "params": params,
            "returns": _type_name(hints.get("return", inspect.signature(func).return_annotation)),
            "since": f"{options.since[0]}.{options.since[1]}" if options.since else None,
            "idempotent": options.idempotent,
        }
    return {
        "spec_version": SPEC_VERSION,
        "endpoint": f"{endpoint.__module__}:{endpoint.__qualname__}",
        "namespace": target.namespace,
        "version": target.version,
        "methods": methods,
    }


@dataclass(frozen=True)
class Change:
    kind: str  # "breaking", "needs-minor", "wrong", "allowed"
    where: str
    what: str


@dataclass
class Diff:
    old_version: str
    new_version: str
    changes: list[Change] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(c.kind in ("breaking", "needs-minor", "wrong") for c in self.changes)


Report = Callable[[str, str], None]


def _diff_method(
    name: str, before: dict[str, Any], after: dict[str, Any], breaking: Report, addition: Report
) -> None:
    if before["returns"] != after["returns"]:
        breaking(name, f"return type {before['returns']} -> {after['returns']}")
    old_params = {p["name"]: p for p in before["params"]}
    new_params = {p["name"]: p for p in after["params"]}
    for pname, p in old_params.items():
        q = new_params.get(pname)
        if q is None:
            breaking(f"{name}({pname})", "parameter removed")
        elif p["type"] != q["type"]:
            breaking(f"{name}({pname})", f"type {p['type']} -> {q['type']}")
        elif q["required"] and not p["required"]:
            breaking(f"{name}({pname})", "parameter became required")
    for pname, q in new_params.items():
        if pname in old_params:
            continue
        if q["required"]:
            breaking(f"{name}({pname})", "required parameter added (give it a default)")
        else:
            addition(f"{name}({pname})", "optional parameter added")


def diff_specs(old: dict[str, Any], new: dict[str, Any]) -> Diff:
    for spec in (old, new):
        if spec.get("spec_version") != SPEC_VERSION or "methods" not in spec:
            raise ConfigError("not a Keel interface spec (export one with `keel spec export`)")
    old_v, new_v = parse_version(old["version"]), parse_version(new["version"])
    diff = Diff(old["version"], new["version"])
    major_bump = new_v[0] > old_v[0]
    minor_bump = new_v[0] == old_v[0] and new_v[1] > old_v[1]
    if new_v < old_v:
        diff.changes.append(
            Change("wrong", "version", f"went down from {old['version']} to {new['version']}")
        )

    def breaking(where: str, what: str) -> None:
        diff.changes.append(Change("allowed" if major_bump else "breaking", where, what))

    def addition(where: str, what: str) -> None:
        if not (minor_bump or major_bump):
            diff.changes.append(Change("needs-minor", where, what + " without a version bump"))

    if old.get("namespace") != new.get("namespace"):
        breaking("namespace", f"changed from {old.get('namespace')!r} to {new.get('namespace')!r}")
    for name, before in old["methods"].items():
        after = new["methods"].get(name)
        if after is None:
            breaking(name, "method removed")
        else:
            _diff_method(name, before, after, breaking, addition)
    for name in new["methods"].keys() - old["methods"].keys():
        addition(name, "method added")
        since = new["methods"][name].get("since")
        if since is not None and parse_version(since) > new_v:
            diff.changes.append(
                Change(
                    "wrong", name, f"since {since} is above the interface version {new['version']}"
                )
            )
    return diff
