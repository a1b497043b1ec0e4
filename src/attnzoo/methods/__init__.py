"""One module per method; importing this package registers them all."""

from . import dense, neighborhood, sliding_window, windows

__all__ = ["dense", "neighborhood", "sliding_window", "windows"]
