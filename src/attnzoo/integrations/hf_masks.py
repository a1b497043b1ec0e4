"""The compact mask descriptor attnzoo registers with transformers' ``AttentionMaskInterface``.

transformers asks the mask function registered under the attention implementation's name for each
forward's mask and passes whatever it returns to the attention function. Registering none makes it
pass ``attention_mask=None`` (padding and custom patterns silently vanish), and registering
``sdpa_mask`` builds an ``[B, 1, Lq, Lk]`` boolean tensor. :func:`mask_descriptor` returns a
:class:`MaskSpec` instead: the 2-D padding mask, the offsets and the pattern (causal or
bidirectional, with the sliding window if any), which the attention function applies itself.

Patterns are recognised by the mask function transformers passes: ``causal_mask_function``,
``bidirectional_mask_function`` and the sliding-window compositions built by
``sliding_window_causal_mask_function`` / ``sliding_window_bidirectional_mask_function``. Anything
else (packed sequences, chunked or block-wise overlays, a user's ``or_mask_function``) is not
guessed: the descriptor then carries transformers' own dense mask, and the attention function
falls back to SDPA with it (logged).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """What a forward's attention mask is, without the ``Lq x Lk`` tensor.

    ``padding``: bool `[B, kv_length]`, True for real tokens (``None``: no padding). Query ``i`` of
    the call sits at position ``q_offset + i``, key ``j`` at ``kv_offset + j``. ``causal``: key
    position <= query position. ``window``: transformers' ``sliding_window`` (causal: query - key
    < window; bidirectional: |query - key| <= window), ``None`` for full attention. ``dense``:
    transformers' boolean mask `[B, 1, q_length, kv_length]` when the pattern was not recognised.
    """

    padding: Tensor | None
    q_offset: int
    kv_offset: int
    q_length: int
    kv_length: int
    causal: bool
    window: int | None = None
    dense: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        # some modeling code reads the mask's shape
        batch = 1 if self.padding is None else self.padding.shape[0]
        return (batch, 1, self.q_length, self.kv_length)

    def to_bool(self, batch: int, device: torch.device) -> Tensor:
        """The mask as a dense bool `[B, 1, q_length, kv_length]` (fallbacks and tests only)."""
        if self.dense is not None:
            return self.dense.to(device)
        q = torch.arange(self.q_length, device=device)[:, None] + self.q_offset
        k = torch.arange(self.kv_length, device=device)[None, :] + self.kv_offset
        allowed = k <= q if self.causal else torch.ones_like(q - k, dtype=torch.bool)
        if self.window is not None:
            allowed = allowed & ((q - k < self.window) if self.causal else ((q - k).abs() <= self.window))
        allowed = allowed[None, None].expand(batch, 1, -1, -1)
        if self.padding is not None:
            allowed = allowed & self.padding.to(device)[:, None, None, :]
        return allowed


def _closure(fn: Callable) -> dict[str, Any]:
    try:
        return dict(inspect.getclosurevars(fn).nonlocals)
    except (TypeError, ValueError):
        return {}


def recognise(mask_function: Callable | None) -> tuple[bool, int | None] | None:
    """``(causal, window)`` for the mask functions transformers builds for standard patterns,
    ``None`` for anything else."""
    from transformers import masking_utils as mu

    if mask_function is None or mask_function is mu.causal_mask_function:
        return True, None
    if mask_function is mu.bidirectional_mask_function:
        return False, None
    parts = _closure(mask_function).get("mask_functions")
    if mask_function.__qualname__ != "and_masks.<locals>.and_mask" or not isinstance(parts, tuple) or len(parts) != 2:
        return None
    overlay, base = parts
    window = _closure(overlay).get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool):
        return None
    if base is mu.causal_mask_function and overlay.__qualname__ == "sliding_window_overlay.<locals>.inner_mask":
        return True, window
    if (
        base is mu.bidirectional_mask_function
        and overlay.__qualname__ == "sliding_window_bidirectional_overlay.<locals>.inner_mask"
    ):
        return False, window
    return None


def mask_descriptor(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> MaskSpec:
    """transformers' mask-function signature; returns a :class:`MaskSpec` (no ``Lq x Lk`` tensor
    for recognised patterns)."""
    from transformers import masking_utils as mu

    q_offset, kv_offset = int(q_offset), int(kv_offset)
    padding = None
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ValueError(
                f"attention_mask: expected the 2-D padding mask [B, length] transformers passes to mask "
                f"functions, got shape {list(attention_mask.shape)}"
            )
        padded = mu.prepare_padding_mask(attention_mask.bool(), kv_length, kv_offset)
        padding = padded[:, kv_offset : kv_offset + kv_length]
        if bool(padding.all()):
            padding = None
    pattern = recognise(mask_function)
    if pattern is None:
        kwargs.pop("allow_is_causal_skip", None)
        dense = mu.sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            allow_is_causal_skip=False,
            **kwargs,
        )
        return MaskSpec(padding, q_offset, kv_offset, q_length, kv_length, True, None, dense)
    causal, window = pattern
    return MaskSpec(padding, q_offset, kv_offset, q_length, kv_length, causal, window)


def eager_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    allowed: Tensor | None,
    scale: float,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Exact attention with the features SDPA lacks: ``softcap`` (scores become
    ``softcap * tanh(scores / softcap)``) and ``sinks`` (gpt-oss's per-head logit `[Hq]` added to
    the softmax's denominator). ``query [B, Hq, Lq, D]``, ``key``/``value [B, Hkv, Lk, D]``,
    ``allowed`` bool broadcastable to `[B, Hq, Lq, Lk]`. Returns `[B, Hq, Lq, Dv]`; rows that see no
    key are 0."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = (query @ key.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    top = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
    weights = torch.exp(scores - top)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    if sinks is not None:
        weights = weights[..., :-1]
    return weights.to(value.dtype) @ value
