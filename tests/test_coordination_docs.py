"""The backend table in the contract is generated from the declared characteristics."""

from __future__ import annotations

from pathlib import Path

from keel.coordination import support_table

CONTRACT = Path(__file__).resolve().parent.parent / "docs" / "coordination-contract.md"


def test_contract_embeds_the_generated_support_table() -> None:
    assert support_table() in CONTRACT.read_text(), (
        "docs/coordination-contract.md is out of date: paste keel.coordination.support_table()"
    )
