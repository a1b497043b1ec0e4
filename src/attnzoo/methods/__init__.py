"""One module per method; importing this package registers them all."""

from . import (
    block_select,
    block_sparse,
    cca,
    dense,
    fixed_sparse,
    linear,
    neighborhood,
    pbs,
    sliding_window,
    strided,
    windows,
)

__all__ = [
    "block_select",
    "block_sparse",
    "cca",
    "dense",
    "fixed_sparse",
    "linear",
    "neighborhood",
    "pbs",
    "sliding_window",
    "strided",
    "windows",
]
