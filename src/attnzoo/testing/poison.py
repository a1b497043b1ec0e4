"""Fill uninitialised allocations with NaN so that a kernel reading memory it never wrote fails."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _poisoned(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.fill_(float("nan"))
    return tensor


@contextlib.contextmanager
def poison_uninitialized() -> Iterator[None]:
    """Within the block, ``torch.empty``, ``torch.empty_like``, ``torch.empty_strided`` and
    ``Tensor.new_empty`` return NaN-filled floating tensors."""
    originals = (torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty)
    empty, empty_like, empty_strided, new_empty = originals
    torch.empty = lambda *a, **kw: _poisoned(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: _poisoned(empty_like(*a, **kw))
    torch.empty_strided = lambda *a, **kw: _poisoned(empty_strided(*a, **kw))
    torch.Tensor.new_empty = lambda self, *a, **kw: _poisoned(new_empty(self, *a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty = originals
