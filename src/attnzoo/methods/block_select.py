"""Content-selected block attention: ``moba`` and ``xattention``.

Both cut the queries and the keys into blocks of ``block_size`` positions counted from position 0
(the last block of each may be shorter), choose for every query block and query head a set of key
blocks from the inputs, and run the block-sparse kernel on the resulting per-head layout
(``[B, Hq, nQB, C]``). The choice is a discrete step: it is made once per call in float32 under
``torch.no_grad`` by one function (:func:`moba_blocks`, :func:`xattention_blocks`) shared by the
fast path and the dense reference, so both attend exactly the same keys. A query head scores the
keys of its own key/value head (GQA). With ``kv_mask``, pooled and strided keys use only the real
keys, and a key block holding no real key is never selected.

Causality (``is_causal=True``, bottom-right aligned: query ``i`` sees key ``j`` iff
``j <= i + Nk - Nq``): a query block's *candidates* are the key blocks entirely visible to every
query of the block; the block(s) crossing the diagonal are always attended (and masked element by
element), future blocks never. The diagonal blocks are never scored: their keys lie partly in the
future of the block's first query, so scoring them would let a query's output depend on later keys
(through the choice of its other blocks). Hence a query's output may depend on the later queries of
its own block (``Method.query_block``), never on later keys or values. Without causality every key
block is a candidate and the query block's *own-position* block(s) (those holding the key positions
aligned with the block's queries, ``[first + Nk - Nq, last + Nk - Nq]`` clamped to the keys) are
always attended.

**moba** (Lu et al., 2025). The score of (query block, key block) is the mean of the block's
queries dotted with the mean of the key block's (real) keys; each query block attends its forced
block(s) plus the best-scoring candidates, ``top_k`` blocks in all (ties to the lower block index).
The paper gates every query token separately; like block-sparse prefill kernels (and the issue this
implements) we select per query block, from the block's mean query, so that a block's queries share
one key layout. ``top_k`` at least the number of key blocks gives dense attention.

**xattention** (Xu et al., 2025). Queries and keys are zero-padded to whole blocks and cut into
``stride``-long groups; the strided query of group ``r`` concatenates ``q[r*s + s-1-i]`` and the
strided key of group ``c`` concatenates ``k[c*s + i]`` for ``i = 0..s-1`` (``s = stride``), so
their product sums one antidiagonal of the ``s x s`` tile. Scores are scaled by ``scale / s`` and
soft-maxed over the strided columns of the row's candidate blocks (columns with no real key
excluded); summing the probabilities over each ``(block_size/s)^2`` tile (real rows only) gives the
block mass (padded keys are zeroed, so they add nothing). Per query block and head the forced
blocks (diagonal or own-position, and the first key block) are kept and the mass of those that are
candidates counts first; then the other candidates follow in decreasing mass (ties to the lower
index), keeping the shortest prefix whose cumulative mass reaches ``threshold`` times the
candidates' total. ``threshold = 1`` keeps every candidate (dense attention). Unlike the paper's
causal prefill, the diagonal blocks' mass is not counted (see above), so a causal query block keeps
somewhat more blocks at a given threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import stats
from ..inputs import AttentionCall
from ..kernels.blocklayout import BlockLayout
from ..kernels.linear_state import compute_dtype
from ..params import MethodParams, param
from ..registry import AttentionOutput, Backend, Capabilities, Decoder, Method, Paper, register
from ._cached import cross_decoder
from ._selection import block_means, block_valid, causal_blocks, layout_from_selection, num_blocks, top_k_blocks
from .block_sparse import causal_visibility, reference_layout, run_layout
from .dense import KVCache, append_kv, init_kv_cache, kv_cache_size
from .fixed_sparse import budget_block, mean_visible_keys

CAPABILITIES = Capabilities(causal=True, noncausal=True, cross=True, gqa=True, kv_mask=True, lse=True, decode=True)


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class MobaParams(MethodParams):
    block_size: int = param(128, "positions per query block and per key block")
    top_k: int = param(4, "key blocks attended per query block, counting the forced diagonal/own block(s)")

    def validate(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (key blocks per query block), got {self.top_k}")


@dataclass(frozen=True)
class XAttentionParams(MethodParams):
    block_size: int = param(128, "positions per query block and per key block")
    stride: int = param(8, "antidiagonal stride of the block scores; must divide block_size")
    threshold: float = param(0.9, "tau in (0, 1]: cumulative block mass kept per query block (1 = every block)")

    def validate(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.stride < 1 or self.block_size % self.stride:
            raise ValueError(f"stride must be >= 1 and divide block_size={self.block_size}, got {self.stride}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")


# ----------------------------------------------------------------------------- shared structure
def own_blocks(call: AttentionCall, block: int) -> Tensor:
    """Bool ``[nQB, nKB]``: key blocks holding a key position aligned (bottom-right) with a query of
    the block, the aligned range clamped to the keys (non-causal forced blocks)."""
    nq, nk = num_blocks(call.q_len, block), num_blocks(call.kv_len, block)
    first_q = torch.arange(nq, device=call.device)[:, None] * block
    last_q = torch.clamp(first_q + block, max=call.q_len) - 1
    lo = torch.clamp(first_q + call.causal_offset, 0, call.kv_len - 1)
    hi = torch.clamp(last_q + call.causal_offset, 0, call.kv_len - 1)
    first_k = torch.arange(nk, device=call.device)[None, :] * block
    last_k = torch.clamp(first_k + block, max=call.kv_len) - 1
    return (first_k <= hi) & (last_k >= lo)


def candidates(call: AttentionCall, block: int) -> tuple[Tensor, Tensor]:
    """Bool ``[B, nQB, nKB]`` pair ``(candidate, forced)``, both restricted to blocks with a real key.

    Causal: candidates are the blocks entirely visible to every query of the block, forced the
    blocks crossing the diagonal. Non-causal: every block is a candidate, forced the own-position
    block(s) (see :func:`own_blocks`)."""
    valid = block_valid(call, block)[:, None, :]
    if call.is_causal:
        allowed, diagonal = causal_blocks(call, block)
        return (allowed & ~diagonal)[None] & valid, diagonal[None] & valid
    own = own_blocks(call, block)
    return valid.expand(call.batch, own.shape[0], own.shape[1]), own[None] & valid


def _per_kv_head(x: Tensor, kv_heads: int) -> Tensor:
    """``[B, Hq, R, E]`` -> ``[B, Hkv, G * R, E]``: the query rows of each key/value head."""
    B, Hq, R, E = x.shape
    return x.reshape(B, kv_heads, (Hq // kv_heads) * R, E)


def expand_blocks(call: AttentionCall, chosen: Tensor, block: int) -> Tensor:
    """Bool ``[B, Hq, Nq, Nk]`` from block choices ``[B, Hq, nQB, nKB]`` (and causality)."""
    qb = torch.arange(call.q_len, device=call.device) // block
    kb = torch.arange(call.kv_len, device=call.device) // block
    visible = chosen[:, :, qb][:, :, :, kb]
    return visible & causal_visibility(call) if call.is_causal else visible


def _selected_reference(name: str, call: AttentionCall, chosen: Tensor, block: int) -> AttentionOutput:
    if stats.active():
        _record(name, layout_from_selection(call, chosen, block))
    return reference_layout(call, expand_blocks(call, chosen, block))


def _selected_run(name: str, call: AttentionCall, layout: BlockLayout) -> AttentionOutput:
    _record(name, layout)
    return run_layout(call, layout)


def _record(name: str, layout: BlockLayout) -> None:
    if stats.active():
        rows = layout.kv_num_blocks.float()
        stats.record(
            name,
            density=layout.density(),
            selected_blocks=float(rows.mean()),
            selected_blocks_max=int(rows.max()),
        )


# ----------------------------------------------------------------------------- moba
@torch.no_grad()
def moba_blocks(call: AttentionCall, p: MobaParams) -> Tensor:
    """Bool ``[B, Hq, nQB, nKB]``: the key blocks each query block of each head attends (before
    causal masking inside the diagonal blocks). Mean query . mean real key per block pair; the
    forced blocks plus the best candidates, ``top_k`` in all. Float32, no N x N tensor."""
    bs = p.block_size
    cand, forced = candidates(call, bs)
    qm = block_means(call.query, bs)  # [B, Hq, nQB, D]
    km = block_means(call.key, bs, call.kv_mask)  # [B, Hkv, nKB, D]
    scores = _per_kv_head(qm, call.kv_heads) @ km.transpose(-1, -2)
    scores = scores.view(call.batch, call.q_heads, qm.shape[2], km.shape[2])
    chosen = top_k_blocks(scores, (cand | forced)[:, None], forced[:, None], p.top_k)
    return chosen.expand(scores.shape)


def moba_select(call: AttentionCall, p: MobaParams) -> BlockLayout:
    """The per-head layout ``moba`` runs on ``call`` (the selection step alone)."""
    return layout_from_selection(call, moba_blocks(call, p), p.block_size)


def moba_reference(call: AttentionCall, p: MobaParams) -> AttentionOutput:
    """Dense softmax over the keys of the selected blocks (:func:`moba_blocks`), causality and padding."""
    return _selected_reference("moba", call, moba_blocks(call, p), p.block_size)


def _moba_run(call: AttentionCall, p: MobaParams) -> AttentionOutput:
    return _selected_run("moba", call, moba_select(call, p))


def _moba_degenerate(call: AttentionCall) -> dict:
    return {"block_size": 16, "top_k": num_blocks(call.kv_len, 16)}


def _moba_budget(call: AttentionCall, keys: int) -> dict:
    """About ``keys`` keys per query: blocks of about ``keys / 4`` (at most 128), ``top_k = keys / block``
    rounded (causal: plus a half, the diagonal block being half visible); every block (dense) from
    ``keys >= Nk`` on."""
    block = budget_block(keys, 4, 128)
    n_blocks = num_blocks(call.kv_len, block)
    if keys >= call.kv_len:
        return {"block_size": block, "top_k": n_blocks}
    top_k = math.floor(keys / block + (1.0 if call.is_causal else 0.5))
    return {"block_size": block, "top_k": max(1, min(n_blocks, top_k))}


@dataclass(frozen=True)
class MobaCache:
    """Decode state: every key `[B, Hkv, N, D]` and value, and each key block's key sum
    `[B, Hkv, nKB, D]` (float32; float64 for float64 inputs) so scoring costs O(N / block_size)."""

    key: Tensor
    value: Tensor
    key_sums: Tensor
    length: int

    def size_bytes(self) -> int:
        return self.key.nbytes + self.value.nbytes + self.key_sums.nbytes


def _moba_init(batch, kv_heads, head_dim, value_dim, dtype, device, p) -> MobaCache:
    kv = init_kv_cache(batch, kv_heads, head_dim, value_dim, dtype, device)
    sums = torch.zeros(batch, kv_heads, 0, head_dim, dtype=compute_dtype(dtype), device=device)
    return MobaCache(kv.key, kv.value, sums, 0)


def _moba_step(call: AttentionCall, cache: MobaCache, p: MobaParams) -> tuple[AttentionOutput, MobaCache]:
    """``"cross"`` semantics: the step's queries are cut into their own query blocks and scored
    like :func:`moba_blocks` against the key blocks' means, read off the running sums instead of
    the keys; only the selected blocks are attended."""
    full, kv = append_kv(call, KVCache(cache.key, cache.value))
    bs = p.block_size
    n_kb = num_blocks(full.kv_len, bs)
    blocks = (cache.length + torch.arange(call.kv_len, device=call.device)) // bs
    sums = F.pad(cache.key_sums, (0, 0, 0, n_kb - cache.key_sums.shape[2]))
    sums = sums.index_add(2, blocks, call.key.to(sums.dtype))
    counts = (full.kv_len - torch.arange(n_kb, device=call.device) * bs).clamp(max=bs)
    km = (sums / counts[:, None]).float()
    qm = block_means(call.query, bs)
    scores = (_per_kv_head(qm, call.kv_heads) @ km.transpose(-1, -2)).view(call.batch, call.q_heads, -1, n_kb)
    cand, forced = candidates(full, bs)
    chosen = top_k_blocks(scores, (cand | forced)[:, None], forced[:, None], p.top_k).expand(scores.shape)
    out = _selected_run("moba", full, layout_from_selection(full, chosen, bs))
    return out, MobaCache(kv.key, kv.value, sums, full.kv_len)


def _moba_state_size(seq_len: int, kv_heads: int, head_dim: int, value_dim: int, p: MobaParams, hq: int) -> int:
    return (
        kv_cache_size(seq_len, kv_heads, head_dim, value_dim, p, hq)
        + num_blocks(seq_len, p.block_size) * kv_heads * head_dim
    )


# ----------------------------------------------------------------------------- xattention
def _strided_scores(call: AttentionCall, p: XAttentionParams) -> Tensor:
    """Float32 ``[B, Hq, nQB * bs/s, nKB * bs/s]``: antidiagonal scores of the stride groups,
    scaled by ``scale / stride`` (queries and keys zero-padded to whole blocks, padded keys zeroed)."""
    bs, s = p.block_size, p.stride
    nq, nk = num_blocks(call.q_len, bs), num_blocks(call.kv_len, bs)
    q = F.pad(call.query.float(), (0, 0, 0, nq * bs - call.q_len))
    k = call.key.float()
    if call.kv_mask is not None:
        k = k * call.kv_mask[:, None, :, None]
    k = F.pad(k, (0, 0, 0, nk * bs - call.kv_len))
    B, Hq, D = call.batch, call.q_heads, call.head_dim
    rows, cols = nq * bs // s, nk * bs // s
    q_strided = q.reshape(B, Hq, rows, s, D).flip(3).reshape(B, Hq, rows, s * D)
    k_strided = k.reshape(B, call.kv_heads, cols, s * D)
    scores = _per_kv_head(q_strided, call.kv_heads) @ k_strided.transpose(-1, -2)
    return scores.view(B, Hq, rows, cols).mul_(call.scale / s)


def _threshold_blocks(mass: Tensor, cand: Tensor, forced: Tensor, tau: float) -> Tensor:
    """Bool like ``mass [B, Hq, nQB, nKB]``: the forced blocks, then the other candidates by
    decreasing mass (ties to the lower index) while the mass kept before them is below ``tau``
    times the candidates' total."""
    mass = mass.masked_fill(~cand, 0.0)
    total = mass.sum(-1, keepdim=True)
    kept = mass.masked_fill(~forced, 0.0).sum(-1, keepdim=True)
    others = mass.masked_fill(~cand | forced, -1.0)  # not rankable: sorted last, never kept
    values, order = torch.sort(others, dim=-1, descending=True, stable=True)
    running = torch.cumsum(values.clamp(min=0.0), dim=-1)
    before = kept + F.pad(running[..., :-1], (1, 0))  # mass kept before each ranked block
    keep_sorted = (values >= 0.0) & (before < tau * total)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return forced | keep


@torch.no_grad()
def xattention_blocks(call: AttentionCall, p: XAttentionParams) -> Tensor:
    """Bool ``[B, Hq, nQB, nKB]``: the key blocks each query block of each head attends (before
    causal masking inside the diagonal blocks), by antidiagonal block mass and the threshold."""
    bs, s = p.block_size, p.stride
    nq, nk = num_blocks(call.q_len, bs), num_blocks(call.kv_len, bs)
    cand, forced = candidates(call, bs)
    first = torch.zeros(nk, dtype=torch.bool, device=call.device)
    first[0] = True
    forced = forced | (first & (cand | forced))
    shape = (call.batch, call.q_heads, nq, nk)
    if p.threshold >= 1.0:
        return (cand | forced)[:, None].expand(shape)
    per = bs // s
    scores = _strided_scores(call, p).view(call.batch, call.q_heads, nq, per, nk, per)
    pos = torch.arange(nk * bs, device=call.device)
    real = pos < call.kv_len
    if call.kv_mask is not None:
        real = F.pad(call.kv_mask, (0, nk * bs - call.kv_len)) & real
    real_cols = real.expand(call.batch, nk * bs).reshape(call.batch, nk, per, s).any(-1)  # [B, nKB, per]
    seen = cand[:, None, :, None, :, None] & real_cols[:, None, None, None, :, :]
    scores = scores.masked_fill_(~seen, float("-inf")).view(call.batch, call.q_heads, nq * per, nk * per)
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # rows with no candidate column: 0
    real_rows = torch.arange(nq * per, device=call.device) * s < call.q_len
    probs.mul_(real_rows[:, None])
    mass = probs.view(*shape[:3], per, nk, per).sum((3, 5))
    return _threshold_blocks(mass, cand[:, None], forced[:, None], p.threshold).expand(shape)


def xattention_select(call: AttentionCall, p: XAttentionParams) -> BlockLayout:
    """The per-head layout ``xattention`` runs on ``call`` (the selection step alone)."""
    return layout_from_selection(call, xattention_blocks(call, p), p.block_size)


def xattention_reference(call: AttentionCall, p: XAttentionParams) -> AttentionOutput:
    """Dense softmax over the keys of the selected blocks (:func:`xattention_blocks`), causality and padding."""
    return _selected_reference("xattention", call, xattention_blocks(call, p), p.block_size)


def _xattention_run(call: AttentionCall, p: XAttentionParams) -> AttentionOutput:
    return _selected_run("xattention", call, xattention_select(call, p))


def _xattention_degenerate(call: AttentionCall) -> dict:
    return {"block_size": 16, "stride": 4, "threshold": 1.0}


def _xattention_budget(call: AttentionCall, keys: int) -> dict:
    """A mass threshold cannot fix a key count: ``threshold = keys / M`` (``M`` the keys a query may
    see on average, ``Nk`` without causality), at most 1 (dense from ``keys >= M`` on), is
    monotone in ``keys`` and matches the density on flat attention; peaked attention reaches the
    threshold with fewer blocks. Blocks of about ``keys / 4`` (16 to 128), stride 8."""
    block = max(16, budget_block(keys, 4, 128))
    return {"block_size": block, "stride": 8, "threshold": float(min(1.0, keys / mean_visible_keys(call)))}


# ----------------------------------------------------------------------------- registration
MOBA = register(
    Method(
        name="moba",
        family="content_sparse",
        exact=False,
        summary=(
            "Mixture of Block Attention: every query block attends the top_k key blocks whose mean key best "
            "matches the block's mean query, always including its diagonal (causal) or own-position block. "
            "The selection is a few small matmuls over pooled blocks; the block-sparse kernel's time is "
            "proportional to the selected blocks."
        ),
        paper=Paper(
            "MoBA: Mixture of Block Attention for Long-Context LLMs (Lu et al., 2025)",
            "https://arxiv.org/abs/2502.13189",
        ),
        capabilities=CAPABILITIES,
        params=MobaParams,
        decoder=Decoder(_moba_init, _moba_step, _moba_state_size, lambda p: "cross"),
        reference=moba_reference,
        backends=(Backend("blocks", _moba_run, description="top-k key blocks per query block, block-sparse kernel"),),
        test_params=({"block_size": 16, "top_k": 2}, {"block_size": 8, "top_k": 3}, {"block_size": 12, "top_k": 1}),
        degenerate_params=_moba_degenerate,
        budget=_moba_budget,
        notes=(
            "Selection is per query block (mean query), not per token as in the paper's gate, as block-sparse "
            "prefill kernels do. Causal diagonal blocks are forced and never scored."
        ),
        query_block=lambda p: p.block_size,
    )
)

XATTENTION = register(
    Method(
        name="xattention",
        family="content_sparse",
        exact=False,
        summary=(
            "XAttention: block importance from antidiagonal sums of strided query-key scores, soft-maxed per "
            "strided row and summed per block; each query block keeps its diagonal and first key blocks plus the "
            "highest-mass blocks until their cumulative mass reaches the threshold. Scoring costs (N/stride)^2; "
            "the block-sparse kernel's time is proportional to the selected blocks."
        ),
        paper=Paper(
            "XAttention: Block Sparse Attention with Antidiagonal Scoring (Xu et al., 2025)",
            "https://arxiv.org/abs/2503.16428",
        ),
        capabilities=CAPABILITIES,
        params=XAttentionParams,
        decoder=cross_decoder("xattention"),
        reference=xattention_reference,
        backends=(Backend("blocks", _xattention_run, description="threshold on antidiagonal block mass"),),
        test_params=(
            {"block_size": 16, "stride": 4, "threshold": 0.9},
            {"block_size": 8, "stride": 8, "threshold": 0.5},
            {"block_size": 12, "stride": 3, "threshold": 0.7},
        ),
        degenerate_params=_xattention_degenerate,
        budget=_xattention_budget,
        notes=(
            "Causal: the softmax of a strided row covers only the key blocks fully visible to its query block "
            "(diagonal blocks are forced and unscored), so no selection depends on future keys."
        ),
        query_block=lambda p: p.block_size,
    )
)


def select(call: AttentionCall, params: MobaParams | XAttentionParams) -> BlockLayout:
    """The layout ``moba`` or ``xattention`` (chosen by the type of ``params``) runs on ``call``."""
    if isinstance(params, MobaParams):
        return moba_select(call, params)
    if isinstance(params, XAttentionParams):
        return xattention_select(call, params)
    raise TypeError(f"params must be MobaParams or XAttentionParams, got {type(params).__name__}")


__all__ = [
    "MOBA",
    "XATTENTION",
    "MobaParams",
    "XAttentionParams",
    "candidates",
    "moba_blocks",
    "moba_select",
    "select",
    "xattention_blocks",
    "xattention_select",
]
