"""Tile layouts for local attention, built per axis in closed form.

Every local pattern here is *separable*: a query sees a key iff, along every axis, the key's
coordinate lies in an interval that depends on the query's coordinate on that axis (sliding
windows, NATTEN neighbourhoods with stride and dilation, HaloNet blocks, Swin windows with
their shift mask). An :class:`Axis` holds those intervals in a *processing order* (dilation
groups made contiguous); :func:`axis_tiles` cuts it into query tiles with the smallest key
span covering each tile; :func:`product_layout` combines the axes into a
:class:`~attnzoo.kernels.tiles.TileLayout` over flat positions. Cost: O(N / tile) tiles plus
one mask per *distinct* tile (interior tiles share one), never an N x N mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .tiles import TileLayout, plan_runs


@dataclass(frozen=True)
class Axis:
    """One axis of a separable pattern.

    ``q_order [Lq]`` / ``k_order [Lk]``: the original coordinates in processing order. Query
    ``q_order[i]`` sees the keys ``k_order[lo[i] .. hi[i]]`` (processing positions, inclusive;
    empty when ``lo > hi``). ``groups`` are processing positions where a new query group
    begins; tiles never straddle one.
    """

    q_order: Tensor
    k_order: Tensor
    lo: Tensor
    hi: Tensor
    groups: tuple[int, ...] = (0,)


def identity_axis(lo: Tensor, hi: Tensor, kv_len: int) -> Axis:
    """An axis in natural order: query ``i`` sees keys ``lo[i] .. hi[i]`` (clipped to the keys)."""
    device = lo.device
    return Axis(
        torch.arange(lo.shape[0], device=device),
        torch.arange(kv_len, device=device),
        lo.clamp(min=0),
        hi.clamp(max=kv_len - 1),
    )


def dilated_axis(q_len: int, kv_len: int, dilation: int, offset: int, interval, device) -> Axis:
    """An axis split into ``dilation`` groups by residue: query ``i`` (aligned to key ``i + offset``)
    and key ``j`` meet only when ``(i + offset) % dilation == j % dilation``. ``interval(g, n)``
    maps in-group query indices ``g`` (a tensor) in a group of ``n`` keys to in-group ``(lo, hi)``."""
    q_parts, k_parts, lo_parts, hi_parts, groups = [], [], [], [], []
    q_done = k_done = 0
    for r in range(dilation):
        keys = torch.arange(r, max(r, kv_len), dilation, device=device)
        aligned = torch.arange(q_len, device=device) + offset
        queries = torch.nonzero(aligned % dilation == r).flatten()
        groups.append(q_done)
        if queries.numel():
            g = torch.div(aligned[queries] - r, dilation, rounding_mode="floor")
            lo, hi = interval(g, keys.numel())
            lo_parts.append(lo.clamp(min=0) + k_done)
            hi_parts.append(hi.clamp(max=keys.numel() - 1) + k_done)
            q_parts.append(queries)
        k_parts.append(keys)
        q_done += queries.numel()
        k_done += keys.numel()
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return Axis(
        torch.cat(q_parts) if q_parts else empty,
        torch.cat(k_parts),
        torch.cat(lo_parts) if lo_parts else empty,
        torch.cat(hi_parts) if hi_parts else empty,
        tuple(sorted(set(g for g in groups if g < q_done))) or (0,),
    )


@dataclass(frozen=True)
class AxisTiles:
    q: Tensor  # [nt, t] original query coordinates, -1 pads
    k: Tensor  # [nt, S] original key coordinates, -1 pads
    mask_id: Tensor  # [nt]
    masks: Tensor  # [M, t, S]


def axis_tiles(axis: Axis, tile: int) -> AxisTiles:
    """Cut the axis into query tiles (within groups) and give each the key span that covers it."""
    device = axis.lo.device
    Lq, Lk = axis.q_order.shape[0], axis.k_order.shape[0]
    bounds = [*axis.groups, Lq]
    starts = [s for g0, g1 in zip(bounds[:-1], bounds[1:]) for s in range(g0, g1, tile)]
    ends = [min(s + tile, next(b for b in bounds if b > s)) for s in starts]
    start_t = torch.tensor(starts, dtype=torch.long, device=device)
    end_t = torch.tensor(ends, dtype=torch.long, device=device)
    pos = start_t[:, None] + torch.arange(tile, device=device)  # [nt, t] processing positions
    valid = pos < end_t[:, None]
    pos = torch.where(valid, pos, 0)
    lo, hi = axis.lo[pos], axis.hi[pos]
    live = valid & (lo <= hi)
    big = torch.iinfo(torch.long).max
    lo_t = torch.where(live, lo, big).amin(1)
    hi_t = torch.where(live, hi, -1).amax(1)
    widths = torch.where(hi_t >= lo_t, hi_t - lo_t + 1, 0)
    span = max(1, min(Lk, int(widths.max()) if widths.numel() else 1))
    k_start = torch.where(hi_t >= lo_t, lo_t, 0).clamp(0, Lk - span)
    rel_lo = torch.where(live, lo - k_start[:, None], span)
    rel_hi = torch.where(live, hi - k_start[:, None], -1)
    signature, mask_id = torch.unique(torch.cat([rel_lo, rel_hi], 1), dim=0, return_inverse=True)
    cols = torch.arange(span, device=device)
    masks = (cols >= signature[:, :tile, None]) & (cols <= signature[:, tile:, None])
    q = torch.where(valid, axis.q_order[pos], -1)
    k = axis.k_order[k_start[:, None] + cols]
    return AxisTiles(q, k, mask_id.reshape(-1), masks)


def _outer(a: Tensor, b: Tensor, combine) -> Tensor:
    """``[n, x]`` and ``[m, y]`` -> ``[n * m, x * y]`` combining every pair of rows and columns."""
    out = combine(a[:, None, :, None], b[None, :, None, :])
    return out.reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def product_layout(axes: list[AxisTiles], q_extent: tuple[int, ...], k_extent: tuple[int, ...]) -> TileLayout:
    """The tile layout over flat (row-major) positions of the separable pattern ``axes``."""
    q_strides = [math.prod(q_extent[i + 1 :]) for i in range(len(q_extent))]
    k_strides = [math.prod(k_extent[i + 1 :]) for i in range(len(k_extent))]

    def flat(coords: Tensor, stride: int) -> Tensor:
        return torch.where(coords >= 0, coords * stride, -1)

    def add(x: Tensor, y: Tensor) -> Tensor:
        return torch.where((x >= 0) & (y >= 0), x + y, -1)

    q = flat(axes[0].q, q_strides[0])
    k = flat(axes[0].k, k_strides[0])
    mask_id, masks = axes[0].mask_id, axes[0].masks
    for ax, qs, ks in zip(axes[1:], q_strides[1:], k_strides[1:]):
        q = _outer(q, flat(ax.q, qs), add)
        k = _outer(k, flat(ax.k, ks), add)
        mask_id = (mask_id[:, None] * ax.masks.shape[0] + ax.mask_id[None, :]).reshape(-1)
        m = masks[:, None, :, None, :, None] & ax.masks[None, :, None, :, None, :]
        masks = m.reshape(masks.shape[0] * ax.masks.shape[0], masks.shape[1] * ax.masks.shape[1], -1)
    # tiles sharing a mask become neighbours, so they run as one chunk with one bias
    order = torch.sort(mask_id, stable=True).indices
    q, k, mask_id = q[order], k[order], mask_id[order]
    return TileLayout(q, k, mask_id, masks, plan_runs(q, k, mask_id))
