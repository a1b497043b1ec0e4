"""Validation of the public call and its normalised description, :class:`AttentionCall`.

Every check here is O(1) in the sequence length or reads only masks, so bad input is
refused before any heavy computation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionCall:
    """One validated attention call. Sequence methods see ``[B, H, N, D]``; spatial methods
    ``[B, H, *spatial, D]`` with ``q_len`` the product of the spatial extents."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    dropout_p: float
    is_causal: bool
    scale: float
    kv_mask: torch.Tensor | None
    return_lse: bool
    return_state: bool
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    spatial_shape: tuple[int, ...] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def device(self) -> torch.device:
        return self.query.device

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.q_heads // self.kv_heads

    @property
    def requires_grad(self) -> bool:
        return self.query.requires_grad or self.key.requires_grad or self.value.requires_grad

    @property
    def causal_offset(self) -> int:
        """Bottom-right alignment: query ``i`` sees key ``j`` iff ``j <= i + causal_offset``."""
        return self.kv_len - self.q_len

    def replace(self, **changes: Any) -> AttentionCall:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        parts = [
            f"query={list(self.query.shape)}",
            f"key={list(self.key.shape)}",
            f"value={list(self.value.shape)}",
            str(self.dtype).replace("torch.", ""),
            self.device.type,
            f"is_causal={self.is_causal}",
        ]
        if self.attn_mask is not None:
            parts.append(f"attn_mask={list(self.attn_mask.shape)} {str(self.attn_mask.dtype)[6:]}")
        if self.kv_mask is not None:
            parts.append("kv_mask")
        if self.dropout_p:
            parts.append(f"dropout_p={self.dropout_p}")
        if self.return_lse:
            parts.append("return_lse")
        return ", ".join(parts)


def _require_tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _check_scale(scale: Any, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {scale!r} ({type(scale).__name__})")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


def _check_dropout(dropout_p: Any) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ranks: tuple[int, ...]) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dim() not in ranks:
            expected = " or ".join(str(r) for r in ranks)
            layout = "[B, H, N, D]" if ranks == (4,) else "[B, H, *spatial, D]"
            raise ValueError(f"{name} must have rank {expected} (layout {layout}), got shape {list(t.shape)}")
        if 0 in t.shape:
            raise ValueError(f"{name} has an empty dimension: shape {list(t.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from query dtype {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
        if t.dim() != query.dim():
            raise ValueError(f"{name} rank {t.dim()} differs from query rank {query.dim()}")


def _check_heads_and_lengths(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
        raise ValueError(f"batch sizes differ: query {query.shape[0]}, key {key.shape[0]}, value {value.shape[0]}")
    if value.shape[1] != key.shape[1]:
        raise ValueError(f"value has {value.shape[1]} heads but key has {key.shape[1]}")
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(
            f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]}) "
            "for grouped-query attention"
        )
    if key.shape[2:-1] != value.shape[2:-1]:
        raise ValueError(
            f"key and value must have the same length, got {list(key.shape[2:-1])} and {list(value.shape[2:-1])}"
        )
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key head size {key.shape[-1]} differs from query head size {query.shape[-1]}")


def _check_kv_mask(kv_mask: Any, batch: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
    if kv_mask is None:
        return None
    kv_mask = _require_tensor("kv_mask", kv_mask)
    if kv_mask.dtype != torch.bool:
        raise TypeError(f"kv_mask must be a bool tensor (True = a real key), got {kv_mask.dtype}")
    if tuple(kv_mask.shape) != (batch, kv_len):
        raise ValueError(f"kv_mask must have shape [B, Nk] = {[batch, kv_len]}, got {list(kv_mask.shape)}")
    if kv_mask.device != device:
        raise ValueError(f"kv_mask is on {kv_mask.device} but query is on {device}")
    return kv_mask


def _check_attn_mask(attn_mask: Any, query: torch.Tensor, full: tuple[int, int, int, int]) -> torch.Tensor | None:
    if attn_mask is None:
        return None
    attn_mask = _require_tensor("attn_mask", attn_mask)
    if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        raise TypeError(f"attn_mask must be bool or have the query dtype {query.dtype}, got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    if attn_mask.dim() < 2 or attn_mask.dim() > 4:
        raise ValueError(
            f"attn_mask must have 2 to 4 dims broadcastable to [B, H, Nq, Nk] = {list(full)}, "
            f"got shape {list(attn_mask.shape)}"
        )
    for size, expected in zip(reversed(attn_mask.shape), reversed(full)):
        if size not in (1, expected):
            raise ValueError(
                f"attn_mask shape {list(attn_mask.shape)} does not broadcast to [B, H, Nq, Nk] = {list(full)}"
            )
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask


def build_call(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any,
    dropout_p: Any,
    is_causal: Any,
    scale: Any,
    enable_gqa: Any,
    kv_mask: Any,
    return_lse: Any,
    return_state: Any,
    spatial_dims: tuple[int, ...] = (),
) -> AttentionCall:
    """Validate the public arguments and describe the call. ``spatial_dims`` lists the number
    of spatial dimensions a spatial method accepts; empty means a sequence method."""
    query = _require_tensor("query", query)
    key = _require_tensor("key", key)
    value = _require_tensor("value", value)
    is_causal = _require_bool("is_causal", is_causal)
    _require_bool("enable_gqa", enable_gqa)
    return_lse = _require_bool("return_lse", return_lse)
    return_state = _require_bool("return_state", return_state)
    ranks = tuple(3 + s for s in spatial_dims) if spatial_dims else (4,)
    _check_qkv(query, key, value, ranks)
    _check_heads_and_lengths(query, key, value)
    q_shape, k_shape = query.shape, key.shape
    spatial_shape = tuple(q_shape[2:-1]) if spatial_dims else None
    q_len = q_shape[2] if len(q_shape) == 4 else math.prod(q_shape[2:-1])
    kv_len = k_shape[2] if len(k_shape) == 4 else math.prod(k_shape[2:-1])
    batch, q_heads, kv_heads = q_shape[0], q_shape[1], k_shape[1]
    full = (batch, q_heads, q_len, kv_len)
    return AttentionCall(
        query=query,
        key=key,
        value=value,
        attn_mask=_check_attn_mask(attn_mask, query, full),
        dropout_p=_check_dropout(dropout_p),
        is_causal=is_causal,
        scale=_check_scale(scale, q_shape[-1]),
        kv_mask=_check_kv_mask(kv_mask, batch, kv_len, query.device),
        return_lse=return_lse,
        return_state=return_state,
        batch=batch,
        q_heads=q_heads,
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=q_shape[-1],
        value_dim=value.shape[-1],
        spatial_shape=spatial_shape,
    )
