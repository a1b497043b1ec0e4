"""``neighborhood``: NATTEN's neighbourhood attention in 1, 2 and 3 spatial dims.

Semantics (NATTEN's, checked against ``natten`` where it is installed), per axis of extent
``L`` with ``kernel_size`` K, ``dilation`` d, ``stride`` s:

* Positions split into ``d`` dilation groups by ``x % d``; a query sees only keys of its own
  group, and within the group works with in-group indices ``g = x // d`` over ``n`` positions.
* Non-causal: queries are grouped ``s`` at a time; the group's *leader* (its centre,
  ``(g // s) * s + s // 2``, at most ``n - 1``) picks the window: centred on the leader, shifted
  inward at the borders so it always holds exactly K keys (``K // 2`` before the centre and
  ``K // 2`` after for odd K; ``K // 2 - 1`` after for even K).
* Causal along an axis: keys ``g' <= g`` and within K of the leader (the group's last query).
* A key is visible iff it is along every axis. ``is_causal=True`` makes every axis causal;
  ``causal_dims`` chooses per axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.intervals import Axis, dilated_axis
from ..params import MethodParams, param
from ..registry import AttentionOutput, Backend, Capabilities, Method, Paper, register
from ._cached import cached_decoder
from ._spatial import per_axis, reference_spatial, require, run_spatial, tile_edge


@dataclass(frozen=True)
class NeighborhoodParams(MethodParams):
    kernel_size: int | tuple[int, ...] = param(7, "keys per query along each axis (an int: every axis)")
    dilation: int | tuple[int, ...] = param(1, "spacing of the neighbours along each axis")
    stride: int | tuple[int, ...] = param(1, "queries per stride group sharing one window, per axis")
    causal_dims: tuple[bool, ...] | None = param(None, "causal per axis (None: is_causal for every axis)")

    def validate(self) -> None:
        for name in ("kernel_size", "dilation", "stride"):
            values = getattr(self, name)
            for value in (values,) if isinstance(values, int) else values:
                if value < 1:
                    raise ValueError(f"{name} must be >= 1 along every axis, got {values}")


def _axis_params(call: AttentionCall, p: NeighborhoodParams, axis: int) -> tuple[int, int, int, bool]:
    ndim = len(call.spatial_shape)
    causal = p.causal_dims[axis] if p.causal_dims is not None else call.is_causal
    return (
        per_axis(p.kernel_size, ndim, "kernel_size")[axis],
        per_axis(p.dilation, ndim, "dilation")[axis],
        per_axis(p.stride, ndim, "stride")[axis],
        causal,
    )


def check(call: AttentionCall, p: NeighborhoodParams) -> None:
    ndim = len(call.spatial_shape)
    kernel = per_axis(p.kernel_size, ndim, "kernel_size")
    dilation = per_axis(p.dilation, ndim, "dilation")
    stride = per_axis(p.stride, ndim, "stride")
    if p.causal_dims is not None:
        require(
            len(p.causal_dims) == ndim,
            f"causal_dims has {len(p.causal_dims)} entries but the input has {ndim} spatial dims",
        )
        require(
            not call.is_causal or all(p.causal_dims),
            f"causal_dims={p.causal_dims} contradicts is_causal=True (every axis causal); pass is_causal=False",
        )
    for axis, (size, k, d, s) in enumerate(zip(call.spatial_shape, kernel, dilation, stride)):
        require(k <= size, f"kernel_size {k} is larger than the extent {size} of spatial dim {axis}")
        require(
            k * d <= size, f"dilation: kernel_size {k} x dilation {d} exceeds the extent {size} of spatial dim {axis}"
        )
        require(s <= k, f"stride {s} is larger than kernel_size {k} along spatial dim {axis}")


def _window(g: Tensor, n: int, k: int, s: int, causal: bool) -> tuple[Tensor, Tensor]:
    """In-group ``(lo, hi)`` of the keys query ``g`` sees in a group of ``n``."""
    if causal:
        leader = torch.clamp((g // s) * s + s - 1, max=n - 1)
        return torch.clamp(leader - k + 1, min=0), g
    right = k // 2 - (1 - k % 2)
    leader = torch.clamp((g // s) * s + s // 2, max=n - 1)
    centre = torch.clamp(leader, min=k // 2, max=n - 1 - right)
    return centre - k // 2, centre + right


def _intervals(size: int, axis: int, call: AttentionCall, p: NeighborhoodParams) -> tuple[Axis, int]:
    k, d, s, causal = _axis_params(call, p, axis)
    built = dilated_axis(size, size, d, 0, lambda g, n: _window(g, n, k, s, causal), call.device)
    return built, tile_edge(call, axis)


def _visible(x: Tensor, y: Tensor, size: int, axis: int, call: AttentionCall, p: NeighborhoodParams) -> Tensor:
    """Pairwise: does query coordinate ``x`` see key coordinate ``y`` along this axis."""
    k, d, s, causal = _axis_params(call, p, axis)
    g, gy = x // d, y // d
    n = (size - x % d + d - 1) // d  # size of the query's dilation group
    same_group = (x % d) == (y % d)
    if causal:
        leader = torch.minimum((g // s) * s + s - 1, n - 1)
        return same_group & (gy <= g) & (leader - gy < k)
    left, right = k // 2, k // 2 - (1 - k % 2)
    leader = torch.minimum((g // s) * s + s // 2, n - 1)
    centre = torch.maximum(torch.minimum(leader, n - 1 - right), torch.full_like(leader, left))
    return same_group & (gy >= centre - left) & (gy <= centre + right)


def budget_extents(shape: tuple[int, ...], keys: int) -> tuple[int, ...]:
    """Per-axis sizes ``min(extent, round(t))`` with ``t`` the solution of ``prod(min(extent, t)) =
    keys``: about ``keys`` positions in all, a cube where the extents allow, each size
    non-decreasing in ``keys``, the whole map from ``keys >= prod(shape)`` on. The spatial methods'
    budgets (``neighborhood``, ``blocked_local``, ``window``) share it."""
    remaining, t = float(keys), float(max(shape))
    for done, extent in enumerate(sorted(shape)):
        edge = remaining ** (1.0 / (len(shape) - done))
        if edge <= extent:
            t = edge
            break
        remaining /= extent
    return tuple(max(1, min(extent, math.floor(t + 0.5))) for extent in shape)


def _budget(call: AttentionCall, keys: int) -> dict:
    """A kernel of about ``keys`` positions (:func:`budget_extents`): every query sees exactly
    ``prod(kernel_size)`` keys (causal: at most); the whole map (dense) from ``keys >= N`` on."""
    return {"kernel_size": budget_extents(call.spatial_shape, keys)}


def _kds(p: NeighborhoodParams) -> tuple[int, int, int]:
    """Decode (1-D): ``(kernel_size, dilation, stride)``."""
    return tuple(per_axis(getattr(p, name), 1, name)[0] for name in ("kernel_size", "dilation", "stride"))


def _min_len(p: NeighborhoodParams) -> int:
    """Decode: the shortest sequence the check accepts. Padding up to exactly it leaves every row
    unchanged: each dilation group then holds ``kernel_size`` positions, so a stride group's
    clamped leader still reaches back to the group's first key."""
    k, d, _ = _kds(p)
    return k * d


def _lookback(p: NeighborhoodParams) -> tuple[int, int]:
    """Decode: a causal query sees back ``kernel_size - 1`` in-group steps; cutting the cache at a
    multiple of ``dilation * stride`` keeps every dilation and stride group as it was. With
    ``stride > 1`` a query's window depends on whether its stride group is complete, which a step
    cannot know: decoding then gives the rows of the sequence seen so far (``"prefix"``)."""
    k, d, s = _kds(p)
    return (k - 1) * d, d * s


def _semantics(p: NeighborhoodParams) -> str:
    return "prefix" if _kds(p)[2] > 1 else "full"


def reference(call: AttentionCall, p: NeighborhoodParams) -> AttentionOutput:
    """Dense softmax under the [N, N] mask built pairwise from NATTEN's definition, per axis."""
    return reference_spatial(call, p, _visible)


def _run_tiles(call: AttentionCall, p: NeighborhoodParams) -> AttentionOutput:
    return run_spatial(call, p, _intervals)


NEIGHBORHOOD = register(
    Method(
        name="neighborhood",
        family="local",
        exact=False,
        summary=(
            "Neighbourhood attention (NAT/DiNAT/GNA, NATTEN semantics) on 1-D, 2-D and 3-D maps: each query "
            "sees exactly kernel_size neighbours per axis, the window shifted inward at borders, with dilation, "
            "stride and per-axis causality. Query tiles attend the box covering their windows through the CPU "
            "flash kernel."
        ),
        paper=Paper("Neighborhood Attention Transformer (Hassani et al., 2023)", "https://arxiv.org/abs/2204.07143"),
        capabilities=Capabilities(
            causal=True, noncausal=True, gqa=True, kv_mask=True, lse=True, decode=True, spatial_dims=(1, 2, 3)
        ),
        params=NeighborhoodParams,
        decoder=cached_decoder("neighborhood", min_len=_min_len, lookback=_lookback, semantics=_semantics),
        reference=reference,
        backends=(Backend("tiles", _run_tiles, description="query tiles over their neighbourhood box"),),
        test_params=({"kernel_size": 3}, {"kernel_size": 2, "dilation": 2, "stride": 2}),
        degenerate_params=lambda call: {"kernel_size": tuple(call.spatial_shape)},
        budget=_budget,
        notes=(
            "Dilated NA: DiNAT (Hassani & Shi, 2022); stride: Generalized Neighborhood Attention (2025); "
            "kernels: Faster Neighborhood Attention (2024)."
        ),
        check=check,
    )
)

__all__ = ["NEIGHBORHOOD", "NeighborhoodParams", "budget_extents"]
