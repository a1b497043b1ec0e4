"""Band-based fixed patterns: ``strided`` (the Sparse Transformer's factorized patterns, Child et
al., 2019) and ``longformer`` (a band plus global tokens, Beltagy et al., 2020; see the end of the
module). ``bigbird`` and ``subsampled`` are in :mod:`.fixed_sparse`, with the shared conventions.

``strided``: with ``s = stride`` and ``c = summary``, query ``i`` sees key ``j`` iff

* ``mode="strided"``: ``|i - j| < s`` or ``(i - j) % s == 0``;
* ``mode="fixed"``: ``j // s == i // s`` (the same chunk) or ``j % s >= s - c`` (the last ``c``
  positions of every chunk, its "summary");

and with ``is_causal=True`` also ``j <= i``. Self-attention only (``Nq == Nk``).

The fast path splits each pattern into two disjoint key sets merged with
:func:`~attnzoo.kernels.lse.merge_attention_states`, so nothing is counted twice and no part
runs an element mask over every block:

* the local part (the band ``|i - j| < s``, or the chunk) is a block layout of 64-blocks;
* the strided part gathers queries and keys in the order ``(position % s, position // s)``
  (``index_select``, differentiable): every residue class becomes a contiguous segment, padded to
  whole blocks, and a block-diagonal layout over the segments attends the same class except the
  query itself (the local part has it). Outputs are gathered back to the original order;
* the fixed pattern's summary part gathers the summary keys into a short sequence (chunk ``t``'s
  ``c`` keys at ``[t c, (t + 1) c)``) and attends those of the other chunks (causal: earlier ones).

Cost: O(N s) for the local part plus O(N^2 / s) (strided) or O(N^2 c / s) (fixed).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .. import stats
from ..inputs import AttentionCall
from ..kernels.blocklayout import BlockLayout
from ..kernels.blocksparse import block_attention
from ..kernels.lse import merge_attention_states
from ..kernels.tiles import cached_layout
from ..params import MethodParams, param
from ..registry import AttentionOutput, Backend, Method, Paper, register
from ._cached import cached_decoder
from ._selection import num_blocks
from .block_sparse import causal_visibility, reference_layout
from .fixed_sparse import CAPABILITIES, global_query_layout, mean_visible_keys, run_planned

BLOCK = 64  # block size of every layout here (a tuning knob, not a parameter)


@dataclass(frozen=True)
class StridedParams(MethodParams):
    mode: Literal["strided", "fixed"] = param("strided", "'strided': band + every stride-th key; 'fixed': chunks")
    stride: int = param(128, "the band half-width (strided) or the chunk length (fixed)")
    summary: int = param(8, "fixed: the last `summary` positions of every chunk are visible to all queries")

    def validate(self) -> None:
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.summary < 1:
            raise ValueError(f"summary must be >= 1, got {self.summary}")
        if self.mode == "fixed" and self.summary > self.stride:
            raise ValueError(
                f"summary must be in [1, stride] = [1, {self.stride}] for mode='fixed', got {self.summary}"
            )


def visibility(call: AttentionCall, p: StridedParams) -> Tensor:
    """Bool ``[Nq, Nk]`` from the definition (small sizes only)."""
    i = torch.arange(call.q_len, device=call.device)[:, None]
    j = torch.arange(call.kv_len, device=call.device)[None, :]
    s = p.stride
    if p.mode == "strided":
        visible = ((i - j).abs() < s) | ((i - j) % s == 0)
    else:
        visible = (j // s == i // s) | (j % s >= s - p.summary)
    return visible & causal_visibility(call) if call.is_causal else visible


def reference(call: AttentionCall, p: StridedParams) -> AttentionOutput:
    """Dense softmax under :func:`visibility` (and the padding mask)."""
    return reference_layout(call, visibility(call, p)[None, None])


# ----------------------------------------------------------------------------- the parts
@dataclass(frozen=True)
class _Part:
    """Attention of (gathered) queries over gathered keys under ``layout``: ``keys`` / ``queries``
    index the inputs padded with one zero row (index ``N`` = padding); ``back`` takes the
    outputs back to the original query order (``None``: queries in original order)."""

    layout: BlockLayout
    keys: Tensor
    queries: Tensor | None = None
    back: Tensor | None = None


def _local_layout(n: int, p: StridedParams, causal: bool, dev: torch.device) -> BlockLayout:
    """The band ``|i - j| < s`` (strided) or the chunk (fixed): query ``i`` sees keys
    ``lo(i) .. hi(i)``, both non-decreasing, so block row ``qb`` spans ``lo(first) .. hi(last)``
    and a block is full when ``lo(last) <= first key`` and ``hi(first) >= last key``."""
    s = p.stride
    if p.mode == "strided":

        def lo(i: Tensor) -> Tensor:
            return i - s + 1

        def hi(i: Tensor) -> Tensor:
            return i + s - 1

        def rule(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (q_idx - kv_idx).abs() < s

    else:

        def lo(i: Tensor) -> Tensor:
            return i // s * s

        def hi(i: Tensor) -> Tensor:
            return i // s * s + s - 1

        def rule(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return q_idx // s == kv_idx // s

    nb = num_blocks(n, BLOCK)
    first = torch.arange(nb, device=dev) * BLOCK
    last = torch.clamp(first + BLOCK, max=n) - 1
    k0, k1 = lo(first).clamp(min=0) // BLOCK, hi(last).clamp(max=n - 1) // BLOCK
    idx = k0[:, None] + torch.arange(int((k1 - k0).max()) + 1, device=dev)
    listed = idx <= k1[:, None]
    first_k, last_k = idx * BLOCK, torch.clamp((idx + 1) * BLOCK, max=n) - 1
    full = listed & (lo(last)[:, None] <= first_k) & (hi(first)[:, None] >= last_k)
    layout = BlockLayout.from_block_lists(torch.where(listed, idx, -1), n, n, BLOCK, full, rule)
    return layout.causal(0) if causal else layout


def _residue_part(n: int, s: int, causal: bool, dev: torch.device) -> _Part | None:
    """Strided part: same residue class mod ``s``, not the query itself (causal: earlier).

    Slot ``r * A' + a`` holds position ``a * s + r`` (class ``r``, ``A = ceil(n / s)`` positions
    per class padded to ``A'``, a multiple of the block ``min(A, 64)``), so class ``r`` is the
    segment of blocks ``[r A' / b, (r + 1) A' / b)`` and each query block visits its segment's
    blocks (causal: up to itself); the diagonal block and blocks with padding are partial."""
    per_class = num_blocks(n, s)
    if per_class < 2:
        return None  # every class has one position: nothing beyond the local part
    block = min(per_class, BLOCK)
    padded = num_blocks(per_class, block) * block
    slots = s * padded
    slot = torch.arange(slots, device=dev)
    pos = slot % padded * s + slot // padded  # original position of each slot (>= n: padding)
    seg = padded // block
    qb = torch.arange(slots // block, device=dev)
    idx = qb[:, None] // seg * seg + torch.arange(seg, device=dev)
    if causal:
        idx = torch.where(idx <= qb[:, None], idx, -1)
    real = (pos < n).view(-1, block).all(-1)
    full = (idx >= 0) & (idx != qb[:, None]) & real[idx.clamp(min=0)]

    def same_class(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        pq, pk = pos[q_idx], pos[kv_idx]
        visible = (pk < n) & (pq % s == pk % s) & (pk != pq)
        return visible & (pk < pq) if causal else visible

    layout = BlockLayout.from_block_lists(idx, slots, slots, block, full, same_class)
    gather = torch.where(pos < n, pos, n)
    original = torch.arange(n, device=dev)
    return _Part(layout, gather, gather, original % s * padded + original // s)


def _summary_part(n: int, s: int, c: int, causal: bool, dev: torch.device) -> _Part | None:
    """Fixed pattern's summary part: the summary keys of other chunks (causal: earlier chunks).

    Short key slot ``t * c + u`` holds position ``t * s + s - c + u`` (``>= n``: padding); key
    blocks hold ``g = max(1, 64 // c)`` chunks, query blocks 64 positions. A block pair is visited
    unless every query and key is in one chunk (causal: unless every key chunk is at or after
    every query chunk), full when no key chunk meets a query chunk (causal: all earlier)."""
    chunks = num_blocks(n, s)
    if chunks < 2:
        return None
    slots = chunks * c
    slot = torch.arange(slots, device=dev)
    pos = slot // c * s + s - c + slot % c
    g = max(1, BLOCK // c)
    bk = g * c
    n_kb, n_qb = num_blocks(slots, bk), num_blocks(n, BLOCK)
    first_q = torch.arange(n_qb, device=dev) * BLOCK
    cq0, cq1 = (first_q // s)[:, None], (torch.clamp(first_q + BLOCK, max=n) - 1)[:, None] // s
    kc0 = (torch.arange(n_kb, device=dev) * g)[None, :]
    kc1 = torch.clamp(kc0 + g, max=chunks) - 1
    real = torch.nn.functional.pad(pos < n, (0, n_kb * bk - slots), value=True).view(n_kb, bk)
    if causal:
        visited = kc0 < cq1
        full = kc1 < cq0
    else:
        visited = ~((cq0 == cq1) & (kc0 == kc1) & (kc0 == cq0))
        full = (kc1 < cq0) | (kc0 > cq1)
    visited = visited & real.any(-1)[None, :]
    full = full & visited & real.all(-1)[None, :]

    def other_chunk(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        pk = pos[kv_idx]
        return (pk < n) & (pk // s < q_idx // s if causal else pk // s != q_idx // s)

    layout = BlockLayout.from_dense_blocks(visited[None, None], full[None, None], n, slots, (BLOCK, bk), other_chunk)
    return _Part(layout, torch.where(pos < n, pos, n))


def _plan(call: AttentionCall, p: StridedParams) -> tuple[BlockLayout, _Part | None]:
    key = ("strided", p, call.q_len, call.is_causal, str(call.device))

    def build():
        n = call.q_len
        local = _local_layout(n, p, call.is_causal, call.device)
        if p.mode == "strided":
            part = _residue_part(n, p.stride, call.is_causal, call.device)
        else:
            part = _summary_part(n, p.stride, p.summary, call.is_causal, call.device)
        return local, part

    return cached_layout(key, build)


def _run_part(call: AttentionCall, part: _Part) -> tuple[Tensor, Tensor]:
    def gathered(x: Tensor, index: Tensor) -> Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, 1)).index_select(2, index)

    q = call.query if part.queries is None else gathered(call.query, part.queries)
    k, v = gathered(call.key, part.keys), gathered(call.value, part.keys)
    kv_mask = None
    if call.kv_mask is not None:
        kv_mask = torch.nn.functional.pad(call.kv_mask, (0, 1)).index_select(1, part.keys)
    out, lse = block_attention(q, k, v, part.layout, call.scale, kv_mask)
    if part.back is not None:
        out, lse = out.index_select(2, part.back), lse.index_select(2, part.back)
    return out, lse


def _run(call: AttentionCall, p: StridedParams) -> AttentionOutput:
    local, part = _plan(call, p)
    out, lse = block_attention(call.query, call.key, call.value, local, call.scale, call.kv_mask)
    if part is not None:
        part_out, part_lse = _run_part(call, part)
        out, lse = merge_attention_states([out, part_out], [lse, part_lse])
    if stats.active():
        pairs = local.density() * call.q_len * call.kv_len
        if part is not None:
            pairs += part.layout.density() * part.layout.q_len * part.layout.kv_len
        stats.record("strided", density=pairs / (call.q_len * call.kv_len))
    return AttentionOutput(out, lse if call.return_lse else None)


def _degenerate(call: AttentionCall) -> dict:
    return {"stride": call.kv_len, "summary": 1}


def _budget(call: AttentionCall, keys: int) -> dict:
    """About ``keys`` keys per query in mode ``"strided"``: a query sees ``K(s) = a s + M / s`` keys
    (the band, ``a = 2`` or causal 1, plus every ``s``-th of the ``M`` visible ones); ``s`` is the
    larger root of ``K(s) = keys`` (increasing in ``keys``), the minimum ``sqrt(M / a)`` where
    ``keys`` is below ``K``'s minimum; ``stride = Nk`` (dense) from ``keys >= Nk`` on."""
    if keys >= call.kv_len:
        return {"mode": "strided", **_degenerate(call)}
    band, visible = (1.0 if call.is_causal else 2.0), mean_visible_keys(call)
    disc = max(keys * keys - 4.0 * band * visible, 0.0)
    stride = max(math.sqrt(visible / band), (keys + math.sqrt(disc)) / (2.0 * band))
    return {"mode": "strided", "stride": max(1, min(call.kv_len, round(stride)))}


STRIDED = register(
    Method(
        name="strided",
        family="block_sparse",
        exact=False,
        summary=(
            "The Sparse Transformer's factorized patterns: 'strided' (a band of width `stride` plus every "
            "stride-th key) and 'fixed' (the query's chunk of `stride` positions plus the last `summary` "
            "positions of every chunk). The band or chunk runs as a block layout; the strided keys as a "
            "block-diagonal layout over queries and keys regrouped by residue class, merged by log-sum-exp."
        ),
        paper=Paper(
            "Generating Long Sequences with Sparse Transformers (Child et al., 2019)",
            "https://arxiv.org/abs/1904.10509",
        ),
        capabilities=CAPABILITIES,
        params=StridedParams,
        decoder=cached_decoder("strided"),
        reference=reference,
        backends=(Backend("blocks", _run, description="band/chunk blocks + residue-class or summary blocks"),),
        test_params=(
            {"stride": 5},
            {"mode": "fixed", "stride": 7, "summary": 2},
            {"mode": "strided", "stride": 20},
            {"mode": "fixed", "stride": 16, "summary": 16},
        ),
        degenerate_params=_degenerate,
        budget=_budget,
        notes="`summary` is the c of the paper's fixed pattern; it is ignored by mode='strided'.",
    )
)


# ----------------------------------------------------------------------------- longformer
@dataclass(frozen=True)
class LongformerParams(MethodParams):
    window: int = param(256, "keys visible on each side of the query, inclusive (causal: left side only)")
    global_tokens: tuple[int, ...] = param((0,), "positions that attend every key and are attended by every query")
    block_size: int = param(64, "block size of the layout (a tuning knob: the pattern does not depend on it)")

    def validate(self) -> None:
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        bad = [t for t in self.global_tokens if t < 0]
        if bad:
            raise ValueError(f"global_tokens must be positions >= 0, got {bad}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


def _longformer_check(call: AttentionCall, p: LongformerParams) -> None:
    bad = [t for t in p.global_tokens if t >= call.q_len]
    if bad:
        raise ValueError(f"global_tokens must be positions in [0, N) = [0, {call.q_len}), got {bad}")


def _global_indicator(call: AttentionCall, p: LongformerParams) -> Tensor:
    flags = torch.zeros(call.q_len, dtype=torch.bool, device=call.device)
    if p.global_tokens:
        flags[torch.tensor(p.global_tokens, device=call.device)] = True
    return flags


def longformer_reference(call: AttentionCall, p: LongformerParams) -> AttentionOutput:
    """Dense softmax where ``|i - j| <= window``, or ``i`` is a global token, or ``j`` is one
    (then intersected with causality)."""
    pos = torch.arange(call.q_len, device=call.device)
    glob = _global_indicator(call, p)
    visible = ((pos[:, None] - pos[None, :]).abs() <= p.window) | glob[:, None] | glob[None, :]
    if call.is_causal:
        visible = visible & causal_visibility(call)
    return reference_layout(call, visible[None, None])


def _longformer_plan(call: AttentionCall, p: LongformerParams):
    key = ("longformer", p, call.q_len, call.is_causal, str(call.device))
    return cached_layout(key, lambda: _build_longformer(call, p))


def _build_longformer(call: AttentionCall, p: LongformerParams):
    """Main layout: per query block the band's key blocks (full where every pair is within the
    window) and the blocks holding global keys, ``mask_mod = band | global key``; the global
    queries run apart over every key."""
    n, bs, w, dev = call.q_len, p.block_size, p.window, call.device
    nb = num_blocks(n, bs)
    first = torch.arange(nb, device=dev) * bs
    last = torch.clamp(first + bs, max=n) - 1
    k0, k1 = (first - w).clamp(min=0) // bs, (last + w).clamp(max=n - 1) // bs
    idx = k0[:, None] + torch.arange(int((k1 - k0).max()) + 1, device=dev)
    listed = idx <= k1[:, None]
    first_k, last_k = idx * bs, torch.clamp((idx + 1) * bs, max=n) - 1
    full = listed & (last[:, None] - first_k <= w) & (last_k - first[:, None] <= w)
    glob = _global_indicator(call, p)
    rows = torch.nonzero(glob).flatten()
    glob_blocks = torch.unique(rows // bs).expand(nb, -1)
    idx = torch.cat([torch.where(listed, idx, -1), glob_blocks], dim=-1)
    full = torch.cat([full, torch.zeros_like(glob_blocks, dtype=torch.bool)], dim=-1)

    def band_or_global_key(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return ((q_idx - kv_idx).abs() <= w) | glob[kv_idx]

    main = BlockLayout.from_block_lists(idx, n, n, bs, full, band_or_global_key)
    main = main.causal(call.causal_offset) if call.is_causal else main
    if rows.numel() == 0:
        return main, None, None
    return main, rows, global_query_layout(rows, n, bs, call.is_causal)


def _longformer_budget(call: AttentionCall, keys: int) -> dict:
    """About ``keys`` keys per query: ``window = keys - 1`` (causal) or ``(keys - 1) // 2`` each side,
    global token 0 kept; ``window = Nk`` (dense) from ``keys >= Nk`` on."""
    if keys >= call.kv_len:
        return {"window": call.kv_len}
    return {"window": keys - 1 if call.is_causal else (keys - 1) // 2}


def _seen_globals(p: LongformerParams, length: int) -> LongformerParams:
    """Decode: global tokens not yet seen are neither queries nor keys of any row so far."""
    return dataclasses.replace(p, global_tokens=tuple(t for t in p.global_tokens if t < length))


def _longformer_lookback(p: LongformerParams) -> tuple[int, int] | None:
    """Decode: without global tokens a query needs only the ``window`` keys before it (the
    pattern is translation invariant: the cache may be cut anywhere)."""
    return None if p.global_tokens else (p.window, 1)


def _longformer_run(call: AttentionCall, p: LongformerParams) -> AttentionOutput:
    return run_planned("longformer", call, _longformer_plan(call, p))


LONGFORMER = register(
    Method(
        name="longformer",
        family="block_sparse",
        exact=False,
        summary=(
            "Longformer's sliding window with global attention: query i sees key j when |i - j| <= window, "
            "or when i or j is one of the `global_tokens` (causal: intersected with j <= i). The band and the "
            "global key columns run as one block layout with an element mask; global queries attend all keys apart."
        ),
        paper=Paper(
            "Longformer: The Long-Document Transformer (Beltagy et al., 2020)", "https://arxiv.org/abs/2004.05150"
        ),
        capabilities=CAPABILITIES,
        params=LongformerParams,
        decoder=cached_decoder("longformer", fit=_seen_globals, lookback=_longformer_lookback),
        reference=longformer_reference,
        backends=(Backend("blocks", _longformer_run, description="band + global key blocks, global rows apart"),),
        test_params=(
            {"window": 5, "block_size": 8},
            {"window": 20, "block_size": 16, "global_tokens": ()},
            {"window": 0, "block_size": 8},
        ),
        degenerate_params=lambda call: {"window": call.kv_len},
        budget=_longformer_budget,
        notes="Longformer's dilated windows are sliding_window's `dilation`; this method has none.",
        check=_longformer_check,
    )
)


__all__ = ["LONGFORMER", "STRIDED", "LongformerParams", "StridedParams", "visibility"]
