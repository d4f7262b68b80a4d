"""`keel spec export` and `keel spec diff` on real endpoint classes, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from keel.cli import app
from keel.messaging import RequestContext, Target, remote
from keel.messaging.spec import diff_specs, export_spec


class ComputeV10:
    target = Target(version="1.0")

    async def boot(self, ctx: RequestContext, name: str, flavor: str = "m1.small") -> str:
        return name

    async def delete(self, ctx: RequestContext, instance_id: str) -> None:
        return None


class ComputeV11(ComputeV10):
    target = Target(version="1.1")

    @remote(since="1.1", idempotent=True)
    async def resize(self, ctx: RequestContext, instance_id: str, flavor: str) -> None:
        return None

    async def boot(
        self, ctx: RequestContext, name: str, flavor: str = "m1.small", zone: str | None = None
    ) -> str:
        return name


class ComputeV12Broken(ComputeV11):
    target = Target(version="1.2")

    async def boot(self, ctx: RequestContext, name: int, image: str) -> str:  # type: ignore[override]
        return str(name)

    delete = None  # type: ignore[assignment]


def test_export_reads_types_defaults_and_versions() -> None:
    spec = export_spec(ComputeV11)
    assert spec["version"] == "1.1"
    boot = spec["methods"]["boot"]
    assert boot["params"] == [
        {"name": "name", "type": "str", "required": True},
        {"name": "flavor", "type": "str", "required": False},
        {"name": "zone", "type": "str | None", "required": False},
    ]
    assert boot["returns"] == "str"
    assert spec["methods"]["resize"]["since"] == "1.1"
    assert spec["methods"]["resize"]["idempotent"] is True


def test_compatible_minor_bump_passes() -> None:
    diff = diff_specs(export_spec(ComputeV10), export_spec(ComputeV11))
    assert not diff.failed
    assert diff.changes == []


def test_breaking_changes_fail() -> None:
    diff = diff_specs(export_spec(ComputeV11), export_spec(ComputeV12Broken))
    assert diff.failed
    found = {(c.kind, c.where, c.what) for c in diff.changes}
    assert ("breaking", "delete", "method removed") in found
    assert ("breaking", "boot(name)", "type str -> int") in found
    assert ("breaking", "boot(image)", "required parameter added (give it a default)") in found
    assert ("breaking", "boot(flavor)", "parameter removed") in found


def test_additions_without_a_bump_fail() -> None:
    old = export_spec(ComputeV10)
    new = export_spec(ComputeV11)
    new["version"] = "1.0"
    diff = diff_specs(old, new)
    assert diff.failed
    assert {c.kind for c in diff.changes} == {"needs-minor", "wrong"}  # resize says since 1.1


def test_cli_export_and_diff(tmp_path: Path) -> None:
    runner = CliRunner()
    old, new, broken = tmp_path / "old.json", tmp_path / "new.json", tmp_path / "broken.json"
    for path, cls in ((old, "ComputeV10"), (new, "ComputeV11"), (broken, "ComputeV12Broken")):
        result = runner.invoke(
            app, ["spec", "export", f"tests.messaging.test_spec:{cls}", "-o", str(path)]
        )
        assert result.exit_code == 0, result.output
    assert json.loads(new.read_text())["version"] == "1.1"
    assert runner.invoke(app, ["spec", "diff", str(old), str(new)]).exit_code == 0
    result = runner.invoke(app, ["spec", "diff", str(new), str(broken)])
    assert result.exit_code == 1
    assert "method removed" in result.output
    bad = runner.invoke(app, ["spec", "export", "no.such.module:Thing"])
    assert bad.exit_code == 2
    assert "cannot load" in bad.output
