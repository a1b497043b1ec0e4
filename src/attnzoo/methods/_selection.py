"""Shared pieces of the content-selected block-sparse methods (moba, xattention, pbs, ...).

They all pool blocks, score query blocks against key blocks, keep a budget of key blocks per
query block and run the block-sparse kernel on the resulting per-head :class:`BlockLayout`.
Selection is computed once per call under ``torch.no_grad`` (it is a discrete choice) in float32,
by the same code for the fast path and the reference, so both attend the same blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.blocklayout import BlockLayout


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def block_means(x: Tensor, block: int, valid: Tensor | None = None) -> Tensor:
    """Mean of each block of ``x [B, H, N, E]`` over its positions (only ``valid [B, N]`` ones
    when given): ``[B, H, nB, E]`` in float32; a block with no valid position gets 0."""
    B, H, N, E = x.shape
    nb = num_blocks(N, block)
    pad = nb * block - N
    if valid is None and not pad:  # the common case: a plain mean, no weighted temporary
        return x.view(B, H, nb, block, E).mean(3, dtype=torch.float32)
    xf = x.float()
    weight = torch.ones(B, N, device=x.device) if valid is None else valid.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
        weight = torch.nn.functional.pad(weight, (0, pad))
    w = weight.view(B, 1, nb, block, 1)
    total = (xf.view(B, H, nb, block, E) * w).sum(3)
    count = w.sum(3)
    return total / count.clamp(min=1.0)


def block_valid(call: AttentionCall, block: int) -> Tensor:
    """Bool ``[B, nKB]``: key blocks holding at least one real (unpadded) key."""
    nb = num_blocks(call.kv_len, block)
    if call.kv_mask is None:
        return torch.ones(call.batch, nb, dtype=torch.bool, device=call.device)
    pad = nb * block - call.kv_len
    ok = torch.nn.functional.pad(call.kv_mask, (0, pad)) if pad else call.kv_mask
    return ok.view(call.batch, nb, block).any(-1)


def causal_blocks(call: AttentionCall, block: int) -> tuple[Tensor, Tensor]:
    """Bool ``[nQB, nKB]`` pairs ``(allowed, diagonal)``: key blocks holding a key some query of
    the block may see causally (bottom-right aligned), and those crossing the causal diagonal."""
    nq, nk = num_blocks(call.q_len, block), num_blocks(call.kv_len, block)
    off = call.causal_offset
    first_q = torch.arange(nq, device=call.device)[:, None] * block
    last_q = torch.clamp(first_q + block, max=call.q_len) - 1
    first_k = torch.arange(nk, device=call.device)[None, :] * block
    last_k = torch.clamp(first_k + block, max=call.kv_len) - 1
    allowed = first_k <= last_q + off
    diagonal = allowed & (last_k > first_q + off)
    return allowed, diagonal


def layout_from_selection(call: AttentionCall, chosen: Tensor, block: int) -> BlockLayout:
    """A per-head layout from bool ``chosen [B, Hq, nQB, nKB]`` (causality and-ed in when the call is causal)."""
    layout = BlockLayout.from_dense_blocks(chosen, chosen, call.q_len, call.kv_len, (block, block), None)
    return layout.causal(call.causal_offset) if call.is_causal else layout


def top_k_blocks(scores: Tensor, allowed: Tensor, forced: Tensor, k: int) -> Tensor:
    """Bool ``[..., nQB, nKB]``: the ``forced`` blocks plus the best-scoring ``allowed`` others, ``k``
    in all per row (fewer when fewer are allowed). Ties go to the lower block index."""
    forced = forced & allowed
    masked = scores.masked_fill(~allowed | forced, float("-inf"))
    extra = (k - forced.sum(-1, keepdim=True)).clamp(min=0)
    n = scores.shape[-1]
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n, device=scores.device).expand_as(order))
    return forced | ((rank < extra) & torch.isfinite(masked))
