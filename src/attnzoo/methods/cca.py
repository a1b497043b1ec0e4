"""``cca``: Core Context Aware attention: raw local keys plus one pooled *core token* per group.

Conventions (self-attention, ``Nq == Nk``; ``g = group_size``, ``w = window``):

* The keys are cut into groups of ``g`` consecutive positions, ``[c * g, (c + 1) * g)`` (the last
  one may be shorter). Group ``c`` is merged into its core token: with ``q_c`` the query at the
  group's last real (unpadded) position -- for GQA the mean of the query heads sharing the
  key/value head -- the weights are ``softmax_j((q_c . k_j) * scale)`` over the group's real keys
  and ``core key = sum_j w_j k_j``, ``core value = sum_j w_j v_j`` (differentiable). A group with
  no real key has no core.
* Causal: query ``t`` sees the raw keys ``start(t) <= j <= t``, where ``start(t)`` is the first
  position of the group holding ``max(t - w + 1, 0)`` (the ``w`` most recent tokens, extended back
  to a group boundary), and the cores of the groups that end before ``start(t)``. A core only reads
  its own group's keys, values and last query, all at or before ``t``: it is strictly causal.
* Non-causal: query ``t`` sees the raw keys of every group overlapping ``[t - w, t + w]`` and the
  cores of every other group.

Every key is counted once, raw or inside its core, so ``group_size=1`` (a core is then its key)
is exactly dense attention. The fast path merges (:func:`merge_attention_states`) the raw part,
run by the sliding-window tile kernel over per-query key intervals, with attention over the
``ceil(Nk / g)`` core tokens, run by the block-sparse kernel with a closed-form layout over the
core sequence: no ``N x N`` tensor anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.blocklayout import BlockLayout
from ..kernels.blocksparse import block_attention
from ..kernels.intervals import axis_tiles, identity_axis, product_layout
from ..kernels.lse import merge_attention_states
from ..kernels.reference import softmax_reference
from ..kernels.tiles import cached_layout, tile_attention
from ..params import MethodParams, param
from ..registry import AttentionOutput, Backend, Capabilities, Method, Paper, register
from ._cached import cached_decoder
from .fixed_sparse import mean_visible_keys

RAW_TILE = 64  # query tile of the raw (local) part
CORE_BLOCK = (64, 64)  # (queries, core tokens) per block of the core part


@dataclass(frozen=True)
class CCAParams(MethodParams):
    group_size: int = param(16, "consecutive tokens merged into one core token (g)")
    window: int = param(
        64, "local tokens kept raw: causal, the query and the window - 1 before it; non-causal, window on each side"
    )

    def validate(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 (the query's own token is always local), got {self.window}")


def num_groups(call: AttentionCall, p: CCAParams) -> int:
    return -(-call.kv_len // p.group_size)


def _bounds(pos: Tensor, causal: bool, p: CCAParams) -> tuple[Tensor, Tensor]:
    """Raw key interval ``[lo, hi]`` of the queries aligned to key positions ``pos`` (``hi`` not
    clipped to the keys). Cores ``c < lo // g`` (and, non-causal, ``c > hi // g``) are visible."""
    g, w = p.group_size, p.window
    if causal:
        return (pos - w + 1).clamp(min=0) // g * g, pos
    return (pos - w).clamp(min=0) // g * g, ((pos + w) // g + 1) * g - 1


def _core_visible(pos: Tensor, core: Tensor, causal: bool, p: CCAParams) -> Tensor:
    """Bool: core ``core`` is visible to the query aligned to ``pos`` (broadcasting)."""
    lo, hi = _bounds(pos, causal, p)
    visible = core < lo // p.group_size
    return visible if causal else visible | (core > hi // p.group_size)


def core_tokens(call: AttentionCall, p: CCAParams) -> tuple[Tensor, Tensor, Tensor]:
    """``(core_key [B, Hkv, nG, D], core_value [B, Hkv, nG, Dv], valid [B, nG])`` (see the module
    docstring); computed in float32 (float64 for float64 inputs), returned in the input dtype.
    ``valid`` is False for groups with no real key (their core is all zeros)."""
    B, Hkv, N, g = call.batch, call.kv_heads, call.kv_len, p.group_size
    nG = num_groups(call, p)
    pad = nG * g - N
    work = torch.float64 if call.dtype == torch.float64 else torch.float32
    real = call.kv_mask if call.kv_mask is not None else torch.ones(B, N, dtype=torch.bool, device=call.device)
    real = torch.nn.functional.pad(real, (0, pad)).view(B, nG, g)
    k = torch.nn.functional.pad(call.key.to(work), (0, 0, 0, pad)).view(B, Hkv, nG, g, call.head_dim)
    v = torch.nn.functional.pad(call.value.to(work), (0, 0, 0, pad)).view(B, Hkv, nG, g, call.value_dim)
    q = call.query.to(work).view(B, Hkv, call.groups, call.q_len, call.head_dim).mean(2)  # [B, Hkv, N, D]
    positions = torch.arange(nG * g, device=call.device).view(nG, g)
    last = torch.where(real, positions, -1).amax(-1)  # [B, nG]: the group's last real position
    valid = last >= 0
    index = last.clamp(min=0)[:, None, :, None].expand(B, Hkv, nG, call.head_dim)
    q_last = q.gather(2, index)  # [B, Hkv, nG, D]
    scores = torch.einsum("bhcd,bhcjd->bhcj", q_last, k) * call.scale
    scores = scores.masked_fill(~real[:, None], float("-inf"))
    scores = torch.where(valid[:, None, :, None], scores, 0.0)  # no real key: finite, weights zeroed below
    weights = torch.softmax(scores, dim=-1) * valid[:, None, :, None]
    core_k = torch.einsum("bhcj,bhcjd->bhcd", weights, k)
    core_v = torch.einsum("bhcj,bhcjd->bhcd", weights, v)
    return core_k.to(call.dtype), core_v.to(call.dtype), valid


def visibility(call: AttentionCall, p: CCAParams) -> tuple[Tensor, Tensor]:
    """Bool ``([Nq, Nk] raw keys, [Nq, nG] cores)`` each query sees, from the definition."""
    g, w = p.group_size, p.window
    t = torch.arange(call.q_len, device=call.device)[:, None] + call.causal_offset
    j = torch.arange(call.kv_len, device=call.device)[None, :]
    c = torch.arange(num_groups(call, p), device=call.device)[None, :]
    if call.is_causal:
        start = (t - w + 1).clamp(min=0) // g * g  # first position of the window's first group
        return (j >= start) & (j <= t), c * g + g - 1 < start

    def near(group: Tensor) -> Tensor:  # the group overlaps [t - w, t + w]
        return (group * g <= t + w) & (group * g + g - 1 >= t - w)

    return near(j // g), ~near(c)


def reference(call: AttentionCall, p: CCAParams) -> AttentionOutput:
    """Dense softmax over the concatenated keys ``[raw keys ; core keys]`` (values alike) under the
    visibility of :func:`visibility`, padded keys and groups with no real key hidden."""
    core_k, core_v, valid = core_tokens(call, p)
    raw, cores = visibility(call, p)
    real = call.kv_mask if call.kv_mask is not None else torch.ones_like(valid[:, :1]).expand(-1, call.kv_len)
    visible = torch.cat([raw, cores], dim=-1)[None, None] & torch.cat([real, valid], dim=-1)[:, None, None, :]
    joint = call.replace(
        key=torch.cat([call.key, core_k], dim=2),
        value=torch.cat([call.value, core_v], dim=2),
        kv_len=call.kv_len + core_k.shape[2],
        kv_mask=None,
    )
    out, lse = softmax_reference(joint, visible)
    return AttentionOutput(out, lse if call.return_lse else None)


def raw_layout(call: AttentionCall, p: CCAParams):
    """Tile layout of the raw part: query ``t`` sees the key interval of :func:`_bounds` (cached)."""
    key = ("cca-raw", p, call.q_len, call.kv_len, call.is_causal, str(call.device))

    def build():
        pos = torch.arange(call.q_len, device=call.device) + call.causal_offset
        lo, hi = _bounds(pos, call.is_causal, p)
        axis = identity_axis(lo, hi, call.kv_len)
        return product_layout([axis_tiles(axis, RAW_TILE)], (call.q_len,), (call.kv_len,))

    return cached_layout(key, build)


def core_layout(call: AttentionCall, p: CCAParams) -> BlockLayout:
    """Block layout over the core sequence (cached). A query's visible cores are a prefix (and,
    non-causal, a suffix), monotone in the query, so a block is visited iff some query of the
    block sees its first (last) core and full iff every query sees all of it."""
    key = ("cca-core", p, call.q_len, call.kv_len, call.is_causal, str(call.device))
    return cached_layout(key, lambda: _build_core_layout(call, p))


def _build_core_layout(call: AttentionCall, p: CCAParams) -> BlockLayout:
    bq, bk = CORE_BLOCK
    n_cores, causal, off, dev = num_groups(call, p), call.is_causal, call.causal_offset, call.device
    n_qb, n_kb = -(-call.q_len // bq), -(-n_cores // bk)
    pos = torch.arange(call.q_len, device=dev)[:, None] + off
    first = torch.arange(n_kb, device=dev)[None, :] * bk
    last = torch.clamp(first + bk, max=n_cores) - 1
    lo, hi = _bounds(pos, causal, p)
    lo, hi = lo // p.group_size, (hi // p.group_size if not causal else torch.full_like(hi, n_cores))
    some = (first < lo) | (last > hi)  # [Nq, nKB]: the query sees some core of the block
    every = (last < lo) | (first > hi)  # ... every core of the block
    pad = n_qb * bq - call.q_len
    some = torch.nn.functional.pad(some, (0, 0, 0, pad), value=False).view(n_qb, bq, n_kb).any(1)
    every = torch.nn.functional.pad(every, (0, 0, 0, pad), value=True).view(n_qb, bq, n_kb).all(1)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return _core_visible(q_idx + off, kv_idx, causal, p)

    return BlockLayout.from_dense_blocks(
        some[None, None], (every & some)[None, None], call.q_len, n_cores, (bq, bk), mask_mod
    )


def _run(call: AttentionCall, p: CCAParams) -> AttentionOutput:
    out, lse = tile_attention(call.query, call.key, call.value, raw_layout(call, p), call.scale, call.kv_mask)
    layout = core_layout(call, p)
    if bool(layout.kv_num_blocks.any()):
        core_k, core_v, valid = core_tokens(call, p)
        core_mask = None if call.kv_mask is None else valid
        core_out, core_lse = block_attention(call.query, core_k, core_v, layout, call.scale, core_mask)
        out, lse = merge_attention_states([out, core_out], [lse, core_lse])
    return AttentionOutput(out, lse if call.return_lse else None)


def _degenerate(call: AttentionCall) -> dict:
    return {"group_size": 1}


def _budget(call: AttentionCall, keys: int) -> dict:
    """About ``keys`` scored tokens per query (raw keys plus cores), ``M`` the keys a query may see
    on average: ``group_size = ceil(2 M / keys)`` gives about ``keys / 2`` cores, and ``window`` the
    rest as raw keys (non-causal ``2 window + 1``, causal ``window``, each plus the extension to
    group boundaries: ``g - 1``, causal ``(g - 1) / 2``); ``group_size = 1`` (dense) once
    ``keys >= M``. The attention weights still cover every key (a core spreads weight over its group)."""
    visible = mean_visible_keys(call)
    if keys >= visible:
        return {"group_size": 1, "window": keys}
    extension = 0.5 if call.is_causal else 1.0  # raw keys added per unit of group size
    # more cores than about 2 sqrt(M / extension) only widen the raw part: the cost's minimum
    group = min(math.ceil(2.0 * visible / keys), round(math.sqrt(visible / extension)))
    raw = keys - visible / group
    if call.is_causal:
        return {"group_size": group, "window": max(1, round(raw - (group - 1) / 2))}
    return {"group_size": group, "window": max(1, round((raw - group) / 2))}


CCA = register(
    Method(
        name="cca",
        family="hybrid",
        exact=False,
        summary=(
            "Core Context Aware attention: tokens are cut into groups of group_size, each merged into one core "
            "token (keys and values weighted by the softmax of the group's last query against its keys); a query "
            "attends the raw keys of its local window (extended back to a group boundary) and the core tokens of "
            "the other groups, each key counted once. Raw part on the sliding-window tile kernel, core part on "
            "the block-sparse kernel over the N / group_size cores, merged by log-sum-exp."
        ),
        paper=Paper(
            "Core Context Aware Attention for Long Context Language Modeling (Chen et al., 2024)",
            "https://arxiv.org/abs/2412.12465",
        ),
        capabilities=Capabilities(
            causal=True, noncausal=True, cross=False, gqa=True, kv_mask=True, lse=True, decode=True
        ),
        params=CCAParams,
        decoder=cached_decoder("cca", keep_queries=True),
        reference=reference,
        query_mixing=True,  # a core token is weighted by its group's last query
        backends=(
            Backend("tiles", _run, description="raw window on the tile kernel + cores on the block kernel, merged"),
        ),
        test_params=(
            {"group_size": 2, "window": 2},
            {"group_size": 8, "window": 16},
            {"group_size": 5, "window": 7},
        ),
        degenerate_params=_degenerate,
        budget=_budget,
        notes=(
            "Self-attention only: a core uses the query at its group's last position. The paper fuses the two "
            "attentions; here they share one softmax (every key counted once), so group_size=1 is dense attention."
        ),
    )
)

__all__ = ["CCA", "CCAParams", "core_layout", "core_tokens", "raw_layout", "visibility"]
