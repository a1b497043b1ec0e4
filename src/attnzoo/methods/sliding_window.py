"""``sliding_window``: each query sees a band of keys around its position, plus optional sinks.

Convention (flash-attn's ``window_size``, inclusive, bottom-right aligned): with
``off = Nk - Nq``, query ``i`` sees key ``j`` iff ``i + off - left <= j <= i + off + right``
(``None`` = unbounded on that side), so an interior query sees ``left + right + 1`` keys.
``is_causal=True`` intersects the band with ``j <= i + off`` (``right`` then has no effect).
``dilation=d`` keeps only keys with ``j = i + off - t * d`` or ``i + off + t * d``, ``t`` from
0 to ``left`` (``right``) steps: ``left + right + 1`` keys spread over a ``d`` times wider range.
``sinks=s`` makes the first ``s`` keys visible to every query (StreamingLLM's attention sinks),
still subject to causality. See :mod:`attnzoo.conventions` for the other libraries' conventions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..api import attention
from ..inputs import AttentionCall
from ..kernels.intervals import axis_tiles, dilated_axis, identity_axis, product_layout
from ..kernels.lse import merge_attention_states
from ..kernels.reference import lse_dtype, softmax_reference
from ..kernels.tiles import cached_layout, tile_attention
from ..params import MethodParams, param
from ..registry import AttentionOutput, Backend, Capabilities, Decoder, Method, Paper, register
from .dense import check_kv

SEQUENCE_TILE = 64


@dataclass(frozen=True)
class SlidingWindowParams(MethodParams):
    window: tuple[int | None, int | None] = param(
        (256, 256), "(left, right) keys visible before/after the aligned position, inclusive; None = unbounded"
    )
    sinks: int = param(0, "the first `sinks` keys are visible to every query (attention sinks)")
    dilation: int = param(1, "keys are taken every `dilation` positions (window counts steps)")

    def validate(self) -> None:
        for side, value in zip(("left", "right"), self.window):
            if value is not None and value < 0:
                raise ValueError(
                    f"window: {side} must be >= 0 or None (unbounded), got {value}; "
                    "flash-attn's -1 is None here (see attnzoo.conventions)"
                )
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if self.dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {self.dilation}")


def _bounds(call: AttentionCall, p: SlidingWindowParams) -> tuple[int, int]:
    """(left, right) in dilation steps, unbounded sides replaced by a value covering all keys."""
    unbounded = call.kv_len + call.q_len
    left = unbounded if p.window[0] is None else p.window[0]
    right = unbounded if p.window[1] is None else p.window[1]
    return left, 0 if call.is_causal else right


def window_visibility(call: AttentionCall, p: SlidingWindowParams, columns: int | None = None) -> Tensor:
    """Bool ``[Nq, columns or Nk]``: the band (and causality), without sinks, from the definition."""
    left, right = _bounds(call, p)
    i = torch.arange(call.q_len, device=call.device)[:, None] + call.causal_offset
    j = torch.arange(call.kv_len if columns is None else columns, device=call.device)[None, :]
    d = p.dilation
    return (j >= i - left * d) & (j <= i + right * d) & ((i - j) % d == 0)


def _sink_visibility(call: AttentionCall, p: SlidingWindowParams, window: Tensor) -> Tensor:
    """Bool ``[Nq, s]``: sink keys a query sees that its window does not already cover."""
    s = min(p.sinks, call.kv_len)
    j = torch.arange(s, device=call.device)[None, :]
    i = torch.arange(call.q_len, device=call.device)[:, None] + call.causal_offset
    visible = ~window
    return visible & (j <= i) if call.is_causal else visible


def reference(call: AttentionCall, p: SlidingWindowParams) -> AttentionOutput:
    """Dense softmax under the [Nq, Nk] band (plus sink columns and padding)."""
    visible = window_visibility(call, p)
    if p.sinks:
        s = min(p.sinks, call.kv_len)
        visible = visible.clone()
        visible[:, :s] |= _sink_visibility(call, p, visible[:, :s])
    visible = visible[None, None]
    if call.kv_mask is not None:
        visible = visible & call.kv_mask[:, None, None, :]
    out, lse = softmax_reference(call, visible)
    return AttentionOutput(out, lse if call.return_lse else None)


def layout(call: AttentionCall, p: SlidingWindowParams):
    key = ("sliding_window", p, call.q_len, call.kv_len, call.is_causal, str(call.device))
    return cached_layout(key, lambda: _build_layout(call, p))


def _build_layout(call: AttentionCall, p: SlidingWindowParams):
    left, right = _bounds(call, p)
    off = call.causal_offset
    if p.dilation == 1:
        pos = torch.arange(call.q_len, device=call.device) + off
        axis = identity_axis(pos - left, pos + right, call.kv_len)
    else:
        axis = dilated_axis(call.q_len, call.kv_len, p.dilation, off, lambda g, n: (g - left, g + right), call.device)
    return product_layout([axis_tiles(axis, SEQUENCE_TILE)], (call.q_len,), (call.kv_len,))


def _sinks_part(call: AttentionCall, p: SlidingWindowParams) -> tuple[Tensor, Tensor]:
    """Attention over the sink keys the window misses: small (``Nq x sinks`` scores)."""
    s = min(p.sinks, call.kv_len)
    visible = _sink_visibility(call, p, window_visibility(call, p, s))[None, None]
    if call.kv_mask is not None:
        visible = visible & call.kv_mask[:, None, None, :s]
    k = call.key[:, :, :s].repeat_interleave(call.groups, dim=1)
    v = call.value[:, :, :s].repeat_interleave(call.groups, dim=1)
    scores = (call.query @ k.transpose(-1, -2)).to(lse_dtype(call.dtype)) * call.scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return weights.to(v.dtype) @ v, lse


def _run_tiles(call: AttentionCall, p: SlidingWindowParams) -> AttentionOutput:
    out, lse = tile_attention(call.query, call.key, call.value, layout(call, p), call.scale, call.kv_mask)
    if p.sinks:
        sink_out, sink_lse = _sinks_part(call, p)
        out, lse = merge_attention_states([out, sink_out], [lse, sink_lse])
    return AttentionOutput(out, lse if call.return_lse else None)


@dataclass(frozen=True)
class WindowCache:
    """Decode state: the sink tokens (the first ``min(length, sinks)``), and a ring of the last
    ``capacity = left * dilation`` tokens after them (all of them with ``left=None``), keys
    `[B, Hkv, n, D]`, values `[B, Hkv, n, Dv]`. Position ``p >= sinks`` lives in ring slot
    ``(p - sinks) % capacity``; positions follow from ``length`` (:func:`ring_positions`)."""

    sink_key: Tensor
    sink_value: Tensor
    ring_key: Tensor
    ring_value: Tensor
    length: int

    def size_bytes(self) -> int:
        return sum(t.nbytes for t in (self.sink_key, self.sink_value, self.ring_key, self.ring_value))


def ring_capacity(p: SlidingWindowParams) -> int | None:
    """Past tokens a causal query may see beyond the sinks: ``left * dilation`` (the query's own
    token comes with its step), ``None`` when unbounded."""
    return None if p.window[0] is None else p.window[0] * p.dilation


def ring_positions(length: int, filled: int, p: SlidingWindowParams, device) -> Tensor:
    """Absolute positions of the ``filled`` ring slots after ``length`` tokens: slot ``s`` holds
    the latest ``q < length`` with ``(q - sinks) % capacity == s``."""
    slots = torch.arange(filled, device=device)
    capacity = ring_capacity(p)
    if capacity is None or capacity == 0:  # unbounded: in order; empty ring: no slots
        return p.sinks + slots
    return length - 1 - (length - 1 - p.sinks - slots) % capacity


def _init_cache(batch, kv_heads, head_dim, value_dim, dtype, device, p) -> WindowCache:
    def empty(dim: int) -> Tensor:
        return torch.zeros(batch, kv_heads, 0, dim, dtype=dtype, device=device)

    return WindowCache(empty(head_dim), empty(value_dim), empty(head_dim), empty(value_dim), 0)


def _write_ring(ring: Tensor, new: Tensor, positions: Tensor, p: SlidingWindowParams) -> Tensor:
    """The ring after writing ``new [B, Hkv, m, E]`` at absolute ``positions`` (all >= sinks)."""
    capacity = ring_capacity(p)
    if capacity is None or ring.shape[2] + new.shape[2] <= capacity:
        return torch.cat([ring, new], dim=2)  # not wrapped yet: slots are consecutive
    if capacity == 0:  # window (0, *): a query sees only itself and the sinks
        return ring
    keep = min(new.shape[2], capacity)
    if ring.shape[2] < capacity:  # slots not yet filled are written below (they hold new positions)
        ring = torch.nn.functional.pad(ring, (0, 0, 0, capacity - ring.shape[2]))
    slots = (positions[-keep:] - p.sinks) % capacity
    return ring.index_copy(2, slots, new[:, :, -keep:])  # out of place: an earlier state stays valid


def _decode_step(
    call: AttentionCall, cache: WindowCache, p: SlidingWindowParams
) -> tuple[AttentionOutput, WindowCache]:
    """Attend the new tokens over the sinks, the ring and themselves under the causal band of
    absolute positions (one small masked dense call), then write them into the sinks or the ring."""
    check_kv(call, cache.ring_key, cache.ring_value)
    start, n, dev = cache.length, call.q_len, call.device
    new_pos = start + torch.arange(n, device=dev)
    key_pos = torch.cat(
        [
            torch.arange(cache.sink_key.shape[2], device=dev),
            ring_positions(start, cache.ring_key.shape[2], p, dev),
            new_pos,
        ]
    )
    diff = new_pos[:, None] - key_pos[None, :]
    left = start + n if p.window[0] is None else p.window[0]
    band = (diff <= left * p.dilation) & (diff % p.dilation == 0)
    visible = (diff >= 0) & (band | (key_pos < p.sinks)[None, :])
    key = torch.cat([cache.sink_key, cache.ring_key, call.key], dim=2)
    value = torch.cat([cache.sink_value, cache.ring_value, call.value], dim=2)
    out = attention(call.query, key, value, attn_mask=visible, scale=call.scale)
    to_sinks = max(0, min(n, p.sinks - start))
    kept = WindowCache(
        torch.cat([cache.sink_key, call.key[:, :, :to_sinks]], dim=2),
        torch.cat([cache.sink_value, call.value[:, :, :to_sinks]], dim=2),
        _write_ring(cache.ring_key, call.key[:, :, to_sinks:], new_pos[to_sinks:], p),
        _write_ring(cache.ring_value, call.value[:, :, to_sinks:], new_pos[to_sinks:], p),
        start + n,
    )
    return AttentionOutput(out), kept


def _state_size(seq_len: int, kv_heads: int, head_dim: int, value_dim: int, p: SlidingWindowParams, hq: int) -> int:
    """Elements per batch row: the sinks and the ring, bounded by ``sinks + left * dilation``."""
    after = max(seq_len - p.sinks, 0)
    capacity = ring_capacity(p)
    ring = after if capacity is None else min(after, capacity)
    return (min(seq_len, p.sinks) + ring) * kv_heads * (head_dim + value_dim)


def _degenerate(call: AttentionCall) -> dict:
    return {"window": (None, None)}


def _budget(call: AttentionCall, keys: int) -> dict:
    """A band of ``keys`` keys: ending at the query (causal) or centred on it; unbounded (dense)
    from ``keys >= Nk`` on."""
    if keys >= call.kv_len:
        return _degenerate(call)
    return {"window": (keys - 1, 0) if call.is_causal else (keys // 2, (keys - 1) // 2)}


SLIDING_WINDOW = register(
    Method(
        name="sliding_window",
        family="local",
        exact=False,
        summary=(
            "Each query attends a band of keys around its (bottom-right aligned) position, flash-attn's "
            "window_size=(left, right), with optional dilation and attention sinks. Tiles of 64 queries "
            "run through the fused CPU flash kernel over strided views of their key span: cost O(N * window)."
        ),
        paper=Paper(
            "Longformer: The Long-Document Transformer (Beltagy et al., 2020)", "https://arxiv.org/abs/2004.05150"
        ),
        capabilities=Capabilities(
            causal=True, noncausal=True, cross=True, gqa=True, kv_mask=True, lse=True, decode=True
        ),
        params=SlidingWindowParams,
        decoder=Decoder(_init_cache, _decode_step, _state_size),
        reference=reference,
        backends=(Backend("tiles", _run_tiles, description="query tiles over their key span (flash kernel on CPU)"),),
        test_params=({"window": (5, 3)}, {"window": (17, 0), "sinks": 2}, {"window": (3, 2), "dilation": 3}),
        degenerate_params=_degenerate,
        budget=_budget,
        notes="Sinks follow StreamingLLM (Xiao et al., 2023); dilation follows Longformer's dilated windows.",
    )
)

__all__ = ["SLIDING_WINDOW", "SlidingWindowParams", "WindowCache", "ring_positions", "window_visibility"]
