"""Assertions a method family's own tests share: refusal before computation, low-precision training,
the largest allocation of a call."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .. import api


def assert_refused(
    method: str, argument: str, query: torch.Tensor, key: torch.Tensor | None = None, **kwargs: Any
) -> str:
    """``attention(query, key, key, method=method, **kwargs)`` raises a ``ValueError`` naming
    ``argument`` before any backend runs; returns the message."""
    key = query if key is None else key
    ran: list[Any] = []
    original = api._execute
    api._execute = lambda *a: ran.append(a)
    try:
        api.attention(query, key, key, method=method, **kwargs)
    except ValueError as error:
        message = str(error)
    else:
        raise AssertionError(f"{method} accepted {kwargs}")
    finally:
        api._execute = original
    assert argument in message, message
    assert not ran, f"{method}: a backend ran before the refusal of {kwargs}"
    return message


def assert_trains(
    method: str,
    *,
    causal: bool = True,
    n: int = 100,
    kv_heads: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    **params: Any,
) -> torch.Tensor:
    """A forward and backward pass in ``dtype`` (GQA, 4 query heads) gives finite outputs and
    gradients of the input dtype; returns the output."""
    q = torch.randn(2, 4, n, 16, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, n, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    out = api.attention(q, k, v, is_causal=causal, method=method, **params)
    out.float().square().sum().backward()
    assert out.dtype == dtype and out.isfinite().all()
    assert all(t.grad is not None and t.grad.dtype == dtype and t.grad.isfinite().all() for t in (q, k, v))
    return out


class LargestAllocation(TorchDispatchMode):
    """The largest storage (in elements of 4 bytes) any op produces while active: a method that
    claims O(N) memory must never allocate an N x N tensor."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // 4)
        return out
