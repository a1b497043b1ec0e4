"""Multi-head attention with projections, for any registered method."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..api import attention
from ..registry import get_method


class MultiheadAttention(nn.Module):
    """Multi-head (or grouped-query) attention whose mechanism is any registered method.

    Inputs are batch-first `[B, N, embed_dim]`; heads are split to `[B, H, N, head_dim]` and
    passed to :func:`attnzoo.attention` with ``method`` and its parameters.

    Args:
        embed_dim: model width; must be divisible by ``num_heads``.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA); must divide ``num_heads``. Default: `num_heads`.
        method: registered method name. Default: `"dense"`.
        backend: force a backend. Default: `None`.
        dropout: attention dropout in training mode (methods with the ``dropout`` capability).
            Default: `0.0`.
        bias: add biases to the projections. Default: `True`.
        **params: the method's parameters, validated now.

    Examples:
        >>> layer = attnzoo.nn.MultiheadAttention(embed_dim=256, num_heads=8)
        >>> y = layer(x, is_causal=True)  # x: [B, N, 256]
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        method: str = "dense",
        backend: str | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        spec = get_method(method)
        self.params = spec.params.from_kwargs(spec.name, params).as_dict()
        self.method, self.backend, self.dropout = spec.name, backend, dropout
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        is_causal: bool = False,
        kv_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``query`` `[B, Nq, E]`; ``key``/``value`` `[B, Nk, E]` (default: ``query``, self-attention).
        Returns `[B, Nq, E]`."""
        key = query if key is None else key
        value = key if value is None else value
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                raise ValueError(f"{name} must be [B, N, {self.embed_dim}], got {list(t.shape)}")
        q = self.q_proj(query).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_proj(key).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(value).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        out = attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            method=self.method,
            backend=self.backend,
            kv_mask=kv_mask,
            **self.params,
        )
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (B, Nq, E)

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"method={self.method!r}" + (f", {params}" if params else "")
        )
