"""One module per method; importing this package registers them all."""

from . import dense, sliding_window

__all__ = ["dense", "sliding_window"]
