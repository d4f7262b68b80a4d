"""Keel: one shared layer for the plumbing between cloud control-plane services."""

from keel.errors import KeelError

__version__ = "0.1.0"

__all__ = ["KeelError", "__version__"]
