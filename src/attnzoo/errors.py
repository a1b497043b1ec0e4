"""Error types. Each subclasses a built-in so that ``except ValueError`` keeps working."""

from __future__ import annotations


class NoBackendError(ValueError):
    """No backend of a method can run these inputs; the message lists every backend's reasons."""
