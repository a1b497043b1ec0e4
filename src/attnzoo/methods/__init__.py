"""One module per method; importing this package registers them all."""

from . import block_sparse, dense, neighborhood, sliding_window, windows

__all__ = ["block_sparse", "dense", "neighborhood", "sliding_window", "windows"]
