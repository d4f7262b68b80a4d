"""The fault tests reuse the conformance suite's per-test topic fixture."""

from tests.conformance.conftest import topic

__all__ = ["topic"]
