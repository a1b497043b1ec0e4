"""Shared plumbing of the separable spatial methods (neighborhood, blocked_local, window).

Each method describes one axis at a time: ``intervals(extent, axis, call, params)`` returns an
:class:`~attnzoo.kernels.intervals.Axis` plus the query tile size along it, and
``visible(coords_q, coords_k, extent, axis, call, params)`` is the pairwise definition used by
the dense reference. A query sees a key iff it does along every axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.intervals import Axis, axis_tiles, product_layout
from ..kernels.reference import softmax_reference
from ..kernels.tiles import TileLayout, cached_layout, tile_attention
from ..registry import AttentionOutput

# Query tile shape per number of spatial dims (measured with benchmarks/local_attention.py).
TILE_SHAPES = {1: (64,), 2: (4, 8), 3: (2, 4, 8)}


def tile_edge(call: AttentionCall, axis: int) -> int:
    return TILE_SHAPES[len(call.spatial_shape)][axis]


AxisFn = Callable[[int, int, AttentionCall, Any], tuple[Axis, int]]
VisibleFn = Callable[[Tensor, Tensor, int, int, AttentionCall, Any], Tensor]


def per_axis(value: int | tuple[int, ...], ndim: int, name: str) -> tuple[int, ...]:
    """An int applies to every axis; a tuple must give one value per spatial dim."""
    if isinstance(value, int):
        return (value,) * ndim
    if len(value) != ndim:
        raise ValueError(f"{name} has {len(value)} entries but the input has {ndim} spatial dims; give one per dim")
    return tuple(value)


def spatial_layout(call: AttentionCall, params: Any, intervals: AxisFn) -> TileLayout:
    tiles = TILE_SHAPES[len(call.spatial_shape)]
    key = (intervals, params, call.spatial_shape, call.is_causal, str(call.device), tiles)
    return cached_layout(key, lambda: _build_layout(call, params, intervals))


def _build_layout(call: AttentionCall, params: Any, intervals: AxisFn) -> TileLayout:
    extent = call.spatial_shape
    tiles = []
    for axis_index, size in enumerate(extent):
        axis, tile = intervals(size, axis_index, call, params)
        tiles.append(axis_tiles(axis, max(1, min(tile, size))))
    return product_layout(tiles, extent, extent)


def run_spatial(call: AttentionCall, params: Any, intervals: AxisFn) -> AttentionOutput:
    """The fast path: tile attention over the separable layout, in the caller's spatial layout."""
    B, Hq = call.batch, call.q_heads
    q = call.query.reshape(B, Hq, call.q_len, call.head_dim)
    k = call.key.reshape(B, call.kv_heads, call.kv_len, call.head_dim)
    v = call.value.reshape(B, call.kv_heads, call.kv_len, call.value_dim)
    out, lse = tile_attention(q, k, v, spatial_layout(call, params, intervals), call.scale, call.kv_mask)
    out = out.reshape(*call.query.shape[:-1], call.value_dim)
    return AttentionOutput(out, lse.reshape(call.query.shape[:-1]) if call.return_lse else None)


def reference_spatial(call: AttentionCall, params: Any, visible: VisibleFn) -> AttentionOutput:
    """Dense reference: the ``[N, N]`` visibility, the AND over axes of the pairwise definition."""
    extent = call.spatial_shape
    coords = torch.meshgrid(*[torch.arange(n, device=call.device) for n in extent], indexing="ij")
    mask = torch.ones(math.prod(extent), math.prod(extent), dtype=torch.bool, device=call.device)
    for axis_index, (size, c) in enumerate(zip(extent, coords)):
        c = c.reshape(-1)
        mask &= visible(c[:, None], c[None, :], size, axis_index, call, params)
    mask = mask[None, None]
    if call.kv_mask is not None:
        mask = mask & call.kv_mask[:, None, None, :]
    out, lse = softmax_reference(call, mask)
    return AttentionOutput(out, lse if call.return_lse else None)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
