"""Fixtures the fault tests share with the conformance suite."""

from tests.conformance.conftest import topic

__all__ = ["topic"]
