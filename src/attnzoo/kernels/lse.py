"""Exact merge of partial attention results by their log-sum-exp."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .reference import lse_dtype, safe_logsumexp


def merge_attention_states(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention computed over disjoint sets of keys into attention over their union.

    If ``(o_i, lse_i)`` is softmax attention of the same queries over key set ``K_i``, then
    ``lse = log(sum_i exp(lse_i))`` and ``out = sum_i exp(lse_i - lse) * o_i`` is attention over
    the union of the ``K_i``. Parts with ``lse_i = -inf`` (no visible key) weigh nothing; a row
    empty in every part gives ``out = 0`` and ``lse = -inf``. Differentiable.

    Args:
        outs: partial outputs, each ``[..., Nq, Dv]`` with the same shape and dtype.
        lses: their log-sum-exps, each ``[..., Nq]`` (float32 or float64).

    Returns:
        ``(out, lse)``: ``out`` in the dtype of ``outs``, ``lse`` float32 (float64 for float64 outs).

    Examples:
        >>> o1, l1 = attnzoo.attention(q, k[:, :, :100], v[:, :, :100], return_lse=True)
        >>> o2, l2 = attnzoo.attention(q, k[:, :, 100:], v[:, :, 100:], return_lse=True)
        >>> out, lse = attnzoo.merge_attention_states([o1, o2], [l1, l2])
    """
    if isinstance(outs, torch.Tensor) or isinstance(lses, torch.Tensor):
        raise TypeError("outs and lses must be sequences of tensors (lists or tuples)")
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be non-empty and of equal length, got {len(outs)} and {len(lses)}")
    first = outs[0]
    for i, (o, lse) in enumerate(zip(outs, lses)):
        if not isinstance(o, torch.Tensor) or not isinstance(lse, torch.Tensor):
            raise TypeError(f"outs[{i}] and lses[{i}] must be tensors")
        if o.shape != first.shape or o.dtype != first.dtype or o.device != first.device:
            raise ValueError(
                f"outs[{i}] has shape {list(o.shape)} {o.dtype} on {o.device}; expected "
                f"{list(first.shape)} {first.dtype} on {first.device} like outs[0]"
            )
        if lse.shape != o.shape[:-1]:
            raise ValueError(f"lses[{i}] must have shape {list(o.shape[:-1])}, got {list(lse.shape)}")
        if not lse.is_floating_point():
            raise TypeError(f"lses[{i}] must be a float tensor, got {lse.dtype}")
    acc = lse_dtype(first.dtype)
    lse_stack = torch.stack([lse.to(acc) for lse in lses])  # (P, ..., Nq)
    lse = safe_logsumexp(lse_stack, dim=0)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    weights = torch.exp(lse_stack - safe)  # parts with lse_i = -inf get exactly 0
    out = sum(w[..., None] * o.to(acc) for w, o in zip(weights, outs))
    return out.to(first.dtype), lse
