"""Masks as dense tensors, for references and for small SDPA masks.

Visibility is ``True`` where a query may see a key. Shapes are kept broadcastable
(``[B or 1, H or 1, Nq, Nk]``) so that nothing larger than needed is built.
"""

from __future__ import annotations

import torch

from ..inputs import AttentionCall


def causal_visibility(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Bottom-right aligned causal mask ``[Nq, Nk]``: query i sees key j iff j <= i + Nk - Nq."""
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(kv_len, device=device)[None, :]
    return cols <= rows + (kv_len - q_len)


def dense_visibility(call: AttentionCall) -> torch.Tensor | None:
    """Combine ``is_causal``, ``kv_mask`` and a boolean ``attn_mask`` into one bool tensor
    broadcastable to ``[B, H, Nq, Nk]``, or ``None`` when every key is visible."""
    visible = None
    if call.is_causal:
        visible = causal_visibility(call.q_len, call.kv_len, call.device)[None, None]
    if call.kv_mask is not None:
        padding = call.kv_mask[:, None, None, :]
        visible = padding if visible is None else visible & padding
    if call.attn_mask is not None and call.attn_mask.dtype == torch.bool:
        visible = call.attn_mask if visible is None else visible & call.attn_mask
    return visible


def dense_bias(call: AttentionCall, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """The additive float mask (``0`` visible, ``-inf`` hidden, plus a float ``attn_mask``),
    broadcastable to ``[B, H, Nq, Nk]``, or ``None`` when there is nothing to add."""
    dtype = dtype or call.dtype
    visible = dense_visibility(call)
    bias = None
    if visible is not None:
        bias = torch.zeros(visible.shape, dtype=dtype, device=call.device).masked_fill(~visible, float("-inf"))
    if call.attn_mask is not None and call.attn_mask.dtype != torch.bool:
        float_mask = call.attn_mask.to(dtype)
        bias = float_mask if bias is None else bias + float_mask
    return bias
