"""The readable softmax-attention reference every softmax method builds on.

It materialises the full score matrix, computes in the inputs' dtype (float64 works) and
is meant to be checked by eye: ``softmax(q k^T * scale + bias, masked) @ v``.
"""

from __future__ import annotations

import torch

from ..inputs import AttentionCall


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def safe_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``logsumexp`` that is ``-inf`` for all-``-inf`` slices with a zero (not NaN) gradient there."""
    peak = x.amax(dim=dim, keepdim=True).detach()
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    total = torch.exp(x - peak).sum(dim=dim)
    nonempty = total > 0
    lse = torch.log(torch.where(nonempty, total, 1.0)) + peak.squeeze(dim)
    return torch.where(nonempty, lse, float("-inf"))


def softmax_reference(
    call: AttentionCall,
    visible: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention with every score materialised.

    Args:
        call: the validated call; its ``query [B, Hq, Nq, D]``, ``key``/``value [B, Hkv, Nk, D]``
            (spatial dims are flattened) and ``scale`` are used, nothing else.
        visible: bool ``[B or 1, H or 1, Nq, Nk]``, True where a query may see a key.
        bias: float ``[B or 1, H or 1, Nq, Nk]`` added to the scores.

    Returns:
        ``out [B, Hq, Nq, Dv]`` in the input dtype (rows with no visible key are 0) and
        ``lse [B, Hq, Nq]`` (``-inf`` for those rows); spatial inputs get ``[B, Hq, *spatial, Dv]``
        and ``[B, Hq, *spatial]``.
    """
    B, Hq, Nq, Nk = call.batch, call.q_heads, call.q_len, call.kv_len
    q = call.query.reshape(B, Hq, Nq, call.head_dim)
    k = call.key.reshape(B, call.kv_heads, Nk, call.head_dim).repeat_interleave(call.groups, dim=1)
    v = call.value.reshape(B, call.kv_heads, Nk, call.value_dim).repeat_interleave(call.groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * call.scale  # (B, Hq, Nq, Nk)
    if bias is not None:
        scores = scores + bias
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = safe_logsumexp(scores, dim=-1)  # (B, Hq, Nq)
    has_key = torch.isfinite(lse)
    weights = torch.exp(scores - torch.where(has_key, lse, 0.0)[..., None])
    out = weights @ v  # (B, Hq, Nq, Dv)
    out = torch.where(has_key[..., None], out, 0.0)
    layout = call.query.shape[:-1]  # spatial methods get [B, H, *spatial, ...] back
    return out.reshape(*layout, call.value_dim), lse.to(lse_dtype(call.dtype)).reshape(layout)
