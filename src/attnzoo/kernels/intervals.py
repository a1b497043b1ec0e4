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

import itertools
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
    k_start: Tensor  # [nt] first key of each tile's span, in processing order
    k_order: Tensor  # [Lk] original key coordinates in processing order
    mask_id: Tensor  # [nt]
    masks: Tensor  # [M, t, S]

    @property
    def span(self) -> int:
        return self.masks.shape[2]


def axis_tiles(axis: Axis, tile: int) -> AxisTiles:
    """Cut the axis into query tiles (within groups) and give each the key span that covers it."""
    device = axis.lo.device
    Lq, Lk = axis.q_order.shape[0], axis.k_order.shape[0]
    bounds = [*axis.groups, Lq]
    starts = [s for g0, g1 in itertools.pairwise(bounds) for s in range(g0, g1, tile)]
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
    return AxisTiles(q, k_start, axis.k_order, mask_id.reshape(-1), masks)


def _columns(a: Tensor, b: Tensor) -> Tensor:
    """Per row, every sum of an ``a`` entry and a ``b`` entry, row-major: ``[T, x], [T, y] -> [T, x * y]``;
    -1 wherever either is -1 (a padded slot)."""
    x, y = a[:, :, None], b[:, None, :]
    return torch.where((x >= 0) & (y >= 0), x + y, -1).reshape(a.shape[0], -1)


def product_layout(axes: list[AxisTiles], q_extent: tuple[int, ...], k_extent: tuple[int, ...]) -> TileLayout:
    """The tile layout over flat (row-major) positions of the separable pattern ``axes``.

    Keys are read from a *key source*: the keys rearranged once so that every tile's keys are
    one contiguous range. For each combination of tiles along axes ``1..n-1`` the source holds a
    block ``[all keys of axis 0 in processing order, span_1, ..., span_{n-1}]``; a tile reads
    rows ``k_start_0[t_0] ..`` of its block. Tiles are numbered with axis 0 fastest, so
    neighbours read evenly spaced ranges (strided views). A 1-D pattern in natural order needs
    no source: tiles read the keys in place. Query and key slots are row-major over the axes.
    """
    n = len(axes)
    device = axes[0].q.device
    q_strides = [math.prod(q_extent[i + 1 :]) for i in range(n)]
    k_strides = [math.prod(k_extent[i + 1 :]) for i in range(n)]
    counts = [ax.q.shape[0] for ax in axes]
    tile = torch.arange(math.prod(counts), device=device)
    digits = []  # t_d of every tile, axis 0 fastest
    for count in counts:
        digits.append(tile % count)
        tile = tile // count
    q = torch.where(axes[0].q >= 0, axes[0].q * q_strides[0], -1)[digits[0]]
    mask_id = axes[0].mask_id[digits[0]]
    masks = axes[0].masks
    block = torch.zeros_like(digits[0])
    for d in range(1, n):
        ax = axes[d]
        q = _columns(q, torch.where(ax.q >= 0, ax.q * q_strides[d], -1)[digits[d]])
        mask_id = mask_id * ax.masks.shape[0] + ax.mask_id[digits[d]]
        m = masks[:, None, :, None, :, None] & ax.masks[None, :, None, :, None, :]
        masks = m.reshape(masks.shape[0] * ax.masks.shape[0], masks.shape[1] * ax.masks.shape[1], -1)
        block = block * counts[d] + digits[d]
    # the key source, block b = row-major (t_1, ..., t_{n-1}): [Lk_0, S_1, ..., S_{n-1}]
    rest = torch.zeros(1, 1, dtype=torch.long, device=device)
    for d in range(1, n):
        ax = axes[d]
        spans = ax.k_order[ax.k_start[:, None] + torch.arange(ax.span, device=device)] * k_strides[d]
        rest = (rest[:, None, :, None] + spans[None, :, None, :]).reshape(rest.shape[0] * spans.shape[0], -1)
    width = rest.shape[1]
    lk0 = axes[0].k_order.shape[0]
    source = ((axes[0].k_order * k_strides[0])[None, :, None] + rest[:, None, :]).reshape(-1)
    identity = n == 1 and bool((axes[0].k_order == torch.arange(lk0, device=device)).all())
    starts = block * (lk0 * width) + axes[0].k_start[digits[0]] * width
    k = starts[:, None] + torch.arange(axes[0].span * width, device=device)
    # tiles sharing a mask become neighbours, so they run as one chunk with one bias
    perm = torch.sort(mask_id, stable=True).indices
    q, k, mask_id = q[perm], k[perm], mask_id[perm]
    return TileLayout(q, k, mask_id, masks, plan_runs(q, k, mask_id), None if identity else source)
