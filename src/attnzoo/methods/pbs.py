"""``pbs``: Permuted Block-Sparse attention: keys sorted by importance within segments, then
block-sparse attention with per-query-block top-k selection over the permuted keys.

Conventions (self-attention, ``Nq == Nk``; ``b = block_size``, ``S = segment``, a multiple of
``b``; everything per query head, GQA key/value heads shared by their query heads):

* **Permutation.** The keys are cut into segments ``[s * S, (s + 1) * S)``. The importance of key
  ``j`` is ``qbar_s . k_j`` with ``qbar_s`` the mean of the queries of ``j``'s own segment ``s``
  (unscaled; computed in float32). Within each segment the keys are sorted by descending
  importance, stably (ties keep their order), padded keys (``kv_mask`` False) last in original
  order; ``perm[b, h, i]`` is the original position of the key at permuted position ``i``. A
  segment's permutation reads only that segment's queries and keys. Keys and values are gathered
  in that order; queries stay in order.
* **Selection.** Queries and permuted keys are cut into blocks of ``b``. For the query block ``i``
  in segment ``s``, the candidates are the permuted key blocks of the other segments holding a
  real key (causal: only segments ``< s``), scored by ``mean query of the block . mean real key of
  the permuted block``; the ``top_k`` best are kept (ties to the lower block). The permuted blocks
  of segment ``s`` itself are always visited.
* **Masking.** Causal attention is by original positions: query ``t`` sees the permuted key at
  ``i`` iff its block is visited and ``perm[b, h, i] <= t + Nk - Nq`` (a ``mask_mod`` looking up
  the permutation inside the blocks that need it).

Attention is invariant to permuting keys and values jointly, so ``top_k >= number of blocks`` is
dense attention. The queries of a block choose keys together (``Method.query_block``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import stats
from ..inputs import AttentionCall
from ..kernels.blocklayout import BlockLayout
from ..kernels.blocksparse import block_attention
from ..params import MethodParams, param
from ..registry import AttentionOutput, Backend, Capabilities, Method, Paper, register
from ._cached import cached_decoder
from ._selection import block_means, num_blocks, top_k_blocks
from .block_sparse import causal_visibility, reference_layout
from .fixed_sparse import budget_block


@dataclass(frozen=True)
class PBSParams(MethodParams):
    block_size: int = param(64, "queries and permuted keys per block")
    segment: int = param(256, "keys permuted within segments of this many positions (a multiple of block_size)")
    top_k: int = param(8, "key blocks of other segments kept per query block, beyond its own segment's")

    def validate(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.segment < 1 or self.segment % self.block_size:
            raise ValueError(
                f"segment must be a positive multiple of block_size ({self.block_size}), got {self.segment}"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def _real(call: AttentionCall) -> Tensor:
    """Bool ``[B, Nk]``: real (unpadded) keys."""
    if call.kv_mask is not None:
        return call.kv_mask
    return torch.ones(call.batch, call.kv_len, dtype=torch.bool, device=call.device)


@torch.no_grad()
def permutation(call: AttentionCall, p: PBSParams) -> Tensor:
    """``perm [B, Hq, Nk]`` (long): the original position of the key at each permuted position
    (see the module docstring)."""
    B, Hq, Hkv, N, D, S = call.batch, call.q_heads, call.kv_heads, call.kv_len, call.head_dim, p.segment
    n_seg = num_blocks(N, S)
    pad = n_seg * S - N
    q_seg = block_means(call.query, S).view(B, Hkv, call.groups, n_seg, D)  # mean query per segment
    k = torch.nn.functional.pad(call.key.float(), (0, 0, 0, pad)).view(B, Hkv, n_seg, S, D)
    importance = torch.einsum("bhgsd,bhsjd->bhgsj", q_seg, k).reshape(B, Hq, n_seg, S)
    kind = torch.where(_real(call), 0, 1)
    kind = torch.nn.functional.pad(kind, (0, pad), value=2).view(B, 1, n_seg, S).expand(B, Hq, n_seg, S)
    importance = importance.masked_fill(kind > 0, float("-inf"))  # padded keys keep their order
    order = torch.sort(importance, dim=-1, descending=True, stable=True).indices
    # real keys first, then padded keys, then positions past the end, each in the order found so far
    order = order.gather(-1, torch.sort(kind.gather(-1, order), dim=-1, stable=True).indices)
    start = torch.arange(n_seg, device=call.device)[:, None] * S
    return (order + start).reshape(B, Hq, n_seg * S)[..., :N]


def permuted_kv_mask(call: AttentionCall, perm: Tensor) -> Tensor | None:
    """``kv_mask`` in permuted order, ``[B, Nk]``: the same for every head (padded keys end each
    segment and every head's segment holds as many), so read off head 0."""
    return None if call.kv_mask is None else call.kv_mask.gather(1, perm[:, 0])


@torch.no_grad()
def chosen_blocks(call: AttentionCall, p: PBSParams, perm: Tensor) -> Tensor:
    """Bool ``[B, Hq, nQB, nKB]``: the permuted key blocks each query block visits (its own
    segment's and the ``top_k`` best candidates; before causal masking)."""
    b, N = p.block_size, call.kv_len
    real = _real(call).gather(1, perm[:, 0])  # [B, Nk], permuted
    k_perm = gather_heads(call.key.float(), perm, call.groups)
    key_means = block_means(k_perm, b, real)  # [B, Hq, nKB, D]
    scores = block_means(call.query, b) @ key_means.transpose(-1, -2)  # [B, Hq, nQB, nKB]
    n_kb = num_blocks(N, b)
    has_real = torch.nn.functional.pad(real, (0, n_kb * b - N)).view(call.batch, n_kb, b).any(-1)
    seg_q = torch.arange(scores.shape[2], device=call.device) * b // p.segment
    seg_k = torch.arange(n_kb, device=call.device) * b // p.segment
    own = seg_q[:, None] == seg_k[None, :]
    other = seg_k[None, :] < seg_q[:, None] if call.is_causal else ~own
    has_real = has_real[:, None, None, :]
    picked = top_k_blocks(scores, other & has_real, torch.zeros_like(own), p.top_k)
    return picked | (own & has_real)


def gather_heads(x: Tensor, perm: Tensor, groups: int) -> Tensor:
    """``x [B, Hkv, N, E]`` reordered per query head: ``out[b, h, i] = x[b, h // groups, perm[b, h, i]]``
    (one differentiable ``index_select``, ``[B, Hq, N, E]``)."""
    B, Hkv, N, E = x.shape
    Hq = perm.shape[1]
    base = (torch.arange(B, device=x.device)[:, None] * Hkv + torch.arange(Hq, device=x.device)[None, :] // groups) * N
    rows = (base[:, :, None] + perm).reshape(-1)
    return x.reshape(B * Hkv * N, E).index_select(0, rows).view(B, Hq, N, E)


def select(call: AttentionCall, p: PBSParams) -> tuple[Tensor, BlockLayout]:
    """The selection step: ``(perm [B, Hq, Nk], layout)``, the layout per head ``[B, Hq, nQB, C]``
    over the permuted key sequence. Causal: a visited block whose keys are all in every query's
    future is dropped, one whose keys are all in every query's past is full, the others partial
    with ``mask_mod = perm[b, h, kv_idx] <= q_idx + offset``."""
    perm = permutation(call, p)
    visited = chosen_blocks(call, p, perm)
    b, N = p.block_size, call.kv_len
    if not call.is_causal:
        return perm, BlockLayout.from_dense_blocks(visited, visited, call.q_len, N, (b, b), None)
    off = call.causal_offset
    n_kb = num_blocks(N, b)
    padded = torch.nn.functional.pad(perm, (0, n_kb * b - N), value=-1).view(*perm.shape[:2], n_kb, b)
    newest = padded.amax(-1)[:, :, None, :]  # [B, Hq, 1, nKB]
    oldest = torch.where(padded >= 0, padded, N).amin(-1)[:, :, None, :]
    first_q = torch.arange(visited.shape[2], device=call.device)[:, None] * b
    last_q = torch.clamp(first_q + b, max=call.q_len) - 1
    visited = visited & (oldest <= last_q + off)
    full = visited & (newest <= first_q + off)

    def mask_mod(bi: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return perm[bi, h, kv_idx] <= q_idx + off

    return perm, BlockLayout.from_dense_blocks(visited, full, call.q_len, N, (b, b), mask_mod)


def reference(call: AttentionCall, p: PBSParams) -> AttentionOutput:
    """Dense softmax on the original keys: query ``t`` sees key ``perm[i]`` iff permuted block
    ``i // b`` is chosen for query block ``t // b`` (and, causal, ``perm[i] <= t + offset``)."""
    perm = permutation(call, p)
    chosen = chosen_blocks(call, p, perm)
    b = p.block_size
    rows = torch.arange(call.q_len, device=call.device) // b
    cols = torch.arange(call.kv_len, device=call.device) // b
    seen = chosen[:, :, rows][:, :, :, cols]  # [B, Hq, Nq, Nk] over permuted key positions
    visible = torch.zeros_like(seen).scatter_(-1, perm[:, :, None, :].expand_as(seen), seen)
    if call.is_causal:
        visible = visible & causal_visibility(call)
    return reference_layout(call, visible)


def _run(call: AttentionCall, p: PBSParams) -> AttentionOutput:
    perm, layout = select(call, p)
    if stats.active():
        stats.record("pbs", density=layout.density(), selected_blocks=float(layout.kv_num_blocks.float().mean()))
    key = gather_heads(call.key, perm, call.groups)
    value = gather_heads(call.value, perm, call.groups)
    out, lse = block_attention(call.query, key, value, layout, call.scale, permuted_kv_mask(call, perm))
    return AttentionOutput(out, lse if call.return_lse else None)


def _degenerate(call: AttentionCall) -> dict:
    return {"block_size": 8, "segment": 16, "top_k": num_blocks(call.kv_len, 8)}


def _budget(call: AttentionCall, keys: int) -> dict:
    """About ``keys`` keys per query: blocks of about ``keys / 8`` (at most 64) in segments of 4 blocks,
    ``top_k`` blocks of other segments for the keys the own segment leaves (causal: half of it is
    visible on average); every block (dense) from ``keys >= Nk`` on."""
    block = budget_block(keys, 8, 64)
    segment = 4 * block
    if keys >= call.kv_len:
        return {"block_size": block, "segment": segment, "top_k": num_blocks(call.kv_len, block)}
    own = segment / 2 if call.is_causal else segment
    return {"block_size": block, "segment": segment, "top_k": max(0, round((keys - own) / block))}


PBS = register(
    Method(
        name="pbs",
        family="content_sparse",
        exact=False,
        summary=(
            "Permuted Block-Sparse attention: within segments, keys are sorted per head by their score against "
            "the segment's mean query, packing important keys into few blocks; each query block then visits "
            "its own segment's permuted blocks (causal by original positions) and the top_k best-scoring "
            "permuted blocks of the other (causal: earlier) segments, on the block-sparse kernel."
        ),
        paper=Paper(
            "Sparser Block-Sparse Attention via Token Permutation (Wang et al., 2025)",
            "https://arxiv.org/abs/2510.21270",
        ),
        capabilities=Capabilities(
            causal=True, noncausal=True, cross=False, gqa=True, kv_mask=True, lse=True, decode=True
        ),
        params=PBSParams,
        # a query block chooses its keys together: a step gives the rows of the sequence so far
        decoder=cached_decoder("pbs", keep_queries=True, semantics=lambda p: "prefix"),
        reference=reference,
        backends=(Backend("blocks", _run, description="permuted keys, per-head block layout on the block kernel"),),
        test_params=(
            {"block_size": 8, "segment": 16, "top_k": 2},
            {"block_size": 16, "segment": 64, "top_k": 1},
            {"block_size": 2, "segment": 4, "top_k": 1},
        ),
        degenerate_params=_degenerate,
        budget=_budget,
        query_block=lambda p: p.block_size,
        notes=(
            "Self-attention only (segments are shared by queries and keys). A key's importance is scored against "
            "its own segment's mean query, so each segment's permutation is causal; blocks are selected by "
            "block-mean scores with a fixed top_k budget."
        ),
    )
)

__all__ = ["PBS", "PBSParams", "chosen_blocks", "gather_heads", "permutation", "select"]
