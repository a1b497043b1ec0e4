"""Non-overlapping windows on 1-D and 2-D maps: ``blocked_local`` (HaloNet) and ``window`` (Swin).

``blocked_local``: the map is cut into blocks of ``block_size`` per axis (the last one may be
shorter); every query of a block sees the keys of its block extended by ``halo`` positions on
each side, clipped at the borders (HaloNets pad with zeros and mask them: the same result).
``is_causal=True`` additionally hides keys after the query along every axis.

``window``: Swin's window attention. Queries see the keys of their own window of
``window_size``. With ``shift=s`` the windows are those of the map rolled by ``-s`` (Swin's
``torch.roll``), and the shifted-window mask applies: positions that the roll brought together
from opposite borders do not see each other. Swin's labels are reproduced exactly: along each
axis of extent ``L`` the rolled positions ``[0, L - w)``, ``[L - w, L - s)`` and ``[L - s, L)``
are separate regions. Extents need not be multiples of the window (the last window is
shorter); no padding tokens are ever attended.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.intervals import Axis
from ..params import MethodParams, param
from ..registry import AttentionOutput, Backend, Capabilities, Method, Paper, register
from ._cached import cached_decoder
from ._spatial import per_axis, reference_spatial, require, run_spatial
from .neighborhood import budget_extents


def _positive(name: str, values: int | tuple[int, ...], minimum: int) -> None:
    for value in (values,) if isinstance(values, int) else values:
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum} along every axis, got {values}")


@dataclass(frozen=True)
class BlockedLocalParams(MethodParams):
    block_size: int | tuple[int, ...] = param(8, "query block edge along each axis (an int: every axis)")
    halo: int | tuple[int, ...] = param(3, "extra key positions on each side of the block, per axis")

    def validate(self) -> None:
        _positive("block_size", self.block_size, 1)
        _positive("halo", self.halo, 0)


def _check_blocked(call: AttentionCall, p: BlockedLocalParams) -> None:
    ndim = len(call.spatial_shape)
    for axis, (size, b) in enumerate(zip(call.spatial_shape, per_axis(p.block_size, ndim, "block_size"))):
        require(b <= size, f"block_size {b} is larger than the extent {size} of spatial dim {axis}")
    per_axis(p.halo, ndim, "halo")


def _blocked_bounds(x: Tensor, size: int, b: int, h: int) -> tuple[Tensor, Tensor]:
    start = (x // b) * b
    return start - h, torch.clamp(start + b, max=size) - 1 + h


def _blocked_intervals(size: int, axis: int, call: AttentionCall, p: BlockedLocalParams) -> tuple[Axis, int]:
    ndim = len(call.spatial_shape)
    b, h = per_axis(p.block_size, ndim, "block_size")[axis], per_axis(p.halo, ndim, "halo")[axis]
    x = torch.arange(size, device=call.device)
    lo, hi = _blocked_bounds(x, size, b, h)
    if call.is_causal:
        hi = torch.minimum(hi, x)
    axis_spec = Axis(x, x, lo.clamp(min=0), hi.clamp(max=size - 1), tuple(range(0, size, b)))
    return axis_spec, b


def _blocked_visible(x: Tensor, y: Tensor, size: int, axis: int, call: AttentionCall, p: BlockedLocalParams) -> Tensor:
    ndim = len(call.spatial_shape)
    b, h = per_axis(p.block_size, ndim, "block_size")[axis], per_axis(p.halo, ndim, "halo")[axis]
    block_start = (x // b) * b
    block_end = torch.clamp(block_start + b, max=size)  # exclusive
    visible = (y >= block_start - h) & (y < block_end + h)
    return visible & (y <= x) if call.is_causal else visible


def _blocked_min_len(p: BlockedLocalParams) -> int:
    """Decode (1-D): the shortest sequence the check accepts, one block."""
    return per_axis(p.block_size, 1, "block_size")[0]


def _blocked_lookback(p: BlockedLocalParams) -> tuple[int, int]:
    """Decode (1-D): a query sees back to its block's start minus the halo; blocks start at
    multiples of ``block_size``, so the cache is cut there."""
    b, h = per_axis(p.block_size, 1, "block_size")[0], per_axis(p.halo, 1, "halo")[0]
    return b - 1 + h, b


def blocked_reference(call: AttentionCall, p: BlockedLocalParams) -> AttentionOutput:
    """Dense softmax under the [N, N] mask: same block along every axis, widened by the halo."""
    return reference_spatial(call, p, _blocked_visible)


def _blocked_budget(call: AttentionCall, keys: int) -> dict:
    """About ``keys`` keys per query: per axis a span ``T`` of :func:`budget_extents` (causal:
    ``2 t - 1``, of which a query sees ``(T + 1) / 2`` on average) split as HaloNet's default
    8 : 3 (``halo = 3 T // 14``, ``block_size = T - 2 halo``); one block (dense) from ``keys >= N`` on."""
    if keys >= call.kv_len:
        return {"block_size": tuple(call.spatial_shape), "halo": 0}
    blocks, halos = [], []
    for extent, t in zip(call.spatial_shape, budget_extents(call.spatial_shape, keys)):
        span = 2 * t - 1 if call.is_causal else t
        halo = 0 if span >= extent else 3 * span // 14
        blocks.append(min(extent, span - 2 * halo))
        halos.append(halo)
    return {"block_size": tuple(blocks), "halo": tuple(halos)}


BLOCKED_LOCAL = register(
    Method(
        name="blocked_local",
        family="local",
        exact=False,
        summary=(
            "HaloNet's blocked local attention on 1-D and 2-D maps: non-overlapping query blocks attend their "
            "block plus a halo of neighbouring positions. Each block is one tile of the CPU flash kernel."
        ),
        paper=Paper(
            "Scaling Local Self-Attention for Parameter Efficient Visual Backbones (Vaswani et al., 2021)",
            "https://arxiv.org/abs/2103.12731",
        ),
        capabilities=Capabilities(
            causal=True, noncausal=True, gqa=True, kv_mask=True, lse=True, decode=True, spatial_dims=(1, 2)
        ),
        params=BlockedLocalParams,
        decoder=cached_decoder("blocked_local", min_len=_blocked_min_len, lookback=_blocked_lookback),
        reference=blocked_reference,
        backends=(
            Backend(
                "tiles", lambda call, p: run_spatial(call, p, _blocked_intervals), description="one tile per block"
            ),
        ),
        test_params=({"block_size": 4, "halo": 1}, {"block_size": 3, "halo": 0}),
        degenerate_params=lambda call: {"block_size": tuple(call.spatial_shape), "halo": 0},
        budget=_blocked_budget,
        check=_check_blocked,
    )
)


@dataclass(frozen=True)
class WindowParams(MethodParams):
    window_size: int | tuple[int, ...] = param(7, "window edge along each axis (an int: every axis)")
    shift: int | tuple[int, ...] = param(0, "cyclic shift of the windows (Swin's shift_size), per axis")

    def validate(self) -> None:
        _positive("window_size", self.window_size, 1)
        _positive("shift", self.shift, 0)


def _window_axis_params(call: AttentionCall, p: WindowParams, axis: int) -> tuple[int, int]:
    ndim = len(call.spatial_shape)
    return per_axis(p.window_size, ndim, "window_size")[axis], per_axis(p.shift, ndim, "shift")[axis]


def _check_window(call: AttentionCall, p: WindowParams) -> None:
    ndim = len(call.spatial_shape)
    sizes = per_axis(p.window_size, ndim, "window_size")
    shifts = per_axis(p.shift, ndim, "shift")
    for axis, (size, w, s) in enumerate(zip(call.spatial_shape, sizes, shifts)):
        require(w <= size, f"window_size {w} is larger than the extent {size} of spatial dim {axis}")
        require(s < w, f"shift {s} must be smaller than window_size {w} along spatial dim {axis}")


def _rolled_bounds(u: Tensor, size: int, w: int, s: int) -> tuple[Tensor, Tensor]:
    """Inclusive bounds, in rolled coordinates ``u``, of the keys a rolled position sees."""
    lo = (u // w) * w
    hi = torch.clamp(lo + w, max=size) - 1
    if s > 0:
        cuts = torch.tensor([size - w, size - s], device=u.device)
        region = torch.bucketize(u, cuts, right=True)  # 0: [0, L-w), 1: [L-w, L-s), 2: [L-s, L)
        starts = torch.tensor([0, size - w, size - s], device=u.device)[region]
        ends = torch.tensor([size - w, size - s, size], device=u.device)[region] - 1
        lo, hi = torch.maximum(lo, starts), torch.minimum(hi, ends)
    return lo, hi


def _window_intervals(size: int, axis: int, call: AttentionCall, p: WindowParams) -> tuple[Axis, int]:
    w, s = _window_axis_params(call, p, axis)
    u = torch.arange(size, device=call.device)
    order = (u + s) % size  # processing position u holds original coordinate (u + s) mod L
    lo, hi = _rolled_bounds(u, size, w, s)
    return Axis(order, order, lo, hi, tuple(range(0, size, w))), w


def _window_visible(x: Tensor, y: Tensor, size: int, axis: int, call: AttentionCall, p: WindowParams) -> Tensor:
    w, s = _window_axis_params(call, p, axis)
    ux, uy = (x - s) % size, (y - s) % size  # torch.roll(t, -s) puts original x at ux
    same_window = (ux // w) == (uy // w)
    if s == 0:
        return same_window

    def label(u: Tensor) -> Tensor:
        return (u >= size - w).long() + (u >= size - s).long()

    return same_window & (label(ux) == label(uy))


def window_reference(call: AttentionCall, p: WindowParams) -> AttentionOutput:
    """Dense softmax under the [N, N] mask: same rolled window and same Swin region on every axis."""
    return reference_spatial(call, p, _window_visible)


WINDOW = register(
    Method(
        name="window",
        family="local",
        exact=False,
        summary=(
            "Swin's window attention on 1-D and 2-D maps: queries attend the keys of their own non-overlapping "
            "window; with shift, the cyclically shifted windows and Swin's shifted-window mask. Each window is "
            "one tile of the CPU flash kernel (no roll, no padding)."
        ),
        paper=Paper(
            "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows (Liu et al., 2021)",
            "https://arxiv.org/abs/2103.14030",
        ),
        capabilities=Capabilities(causal=False, noncausal=True, gqa=True, kv_mask=True, lse=True, spatial_dims=(1, 2)),
        params=WindowParams,
        reference=window_reference,
        backends=(
            Backend(
                "tiles", lambda call, p: run_spatial(call, p, _window_intervals), description="one tile per window"
            ),
        ),
        test_params=({"window_size": 4, "shift": 2}, {"window_size": 3}),
        degenerate_params=lambda call: {"window_size": tuple(call.spatial_shape), "shift": 0},
        budget=lambda call, keys: {"window_size": budget_extents(call.spatial_shape, keys), "shift": 0},
        notes="DaViT's spatial windows are this pattern without the shift.",
        check=_check_window,
    )
)

__all__ = ["BLOCKED_LOCAL", "WINDOW", "BlockedLocalParams", "WindowParams"]
