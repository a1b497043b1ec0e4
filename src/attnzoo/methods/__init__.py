"""One module per method; importing this package registers them all."""

from . import dense

__all__ = ["dense"]
