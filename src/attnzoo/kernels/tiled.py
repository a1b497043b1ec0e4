"""Exact attention by online softmax over key blocks, in plain PyTorch, with its own backward.

Queries are processed in tiles of ``q_block`` rows; for each tile, key blocks of ``kv_block``
columns are visited once while a running max ``m``, normaliser ``l`` and accumulator are
updated (FlashAttention's recurrence). Extra memory is O(q_block * kv_block) per head for the
scores plus the output: nothing N x N is ever built. Causal tiles beyond the diagonal are
skipped. The backward recomputes scores tile by tile from the saved log-sum-exp (FlashAttention-2)
and folds in the gradient of the returned log-sum-exp, so ``lse`` is differentiable too.

GQA is handled by viewing queries as ``[B, Hkv, G, Nq, D]`` so keys and values are never copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .reference import lse_dtype

Q_BLOCK = 256
KV_BLOCK = 256


@dataclass(frozen=True)
class TileMasks:
    """Everything that hides or shifts scores, sliced tile by tile (all optional)."""

    is_causal: bool
    kv_mask: torch.Tensor | None  # (B, Nk) bool
    mask: torch.Tensor | None  # (B|1, H|1, Nq|1, Nk|1) bool
    bias: torch.Tensor | None  # (B|1, H|1, Nq|1, Nk|1) float

    def kv_end(self, i1: int, q_len: int, kv_len: int) -> int:
        """Keys past this index are invisible to every query row before ``i1``."""
        if not self.is_causal:
            return kv_len
        return max(0, min(kv_len, i1 + kv_len - q_len))

    def apply(
        self, scores: torch.Tensor, i0: int, i1: int, j0: int, j1: int, q_len: int, kv_len: int, groups: int
    ) -> torch.Tensor:
        """Mask a score tile ``(B, Hkv, G, i1-i0, j1-j0)`` in place and return it."""
        if self.bias is not None:
            scores += _tile(self.bias, i0, i1, j0, j1, groups)
        hidden = None
        if self.is_causal and j1 - 1 > i0 + kv_len - q_len:
            rows = torch.arange(i0, i1, device=scores.device)[:, None] + (kv_len - q_len)
            hidden = torch.arange(j0, j1, device=scores.device)[None, :] > rows
        if self.kv_mask is not None:
            padding = ~self.kv_mask[:, None, None, None, j0:j1]
            hidden = padding if hidden is None else hidden | padding
        if self.mask is not None:
            outside = ~_tile(self.mask, i0, i1, j0, j1, groups)
            hidden = outside if hidden is None else hidden | outside
        if hidden is not None:
            scores.masked_fill_(hidden, float("-inf"))
        return scores


def _tile(mask: torch.Tensor, i0: int, i1: int, j0: int, j1: int, groups: int) -> torch.Tensor:
    """Slice a broadcastable ``[B|1, H|1, Nq|1, Nk|1]`` mask to a tile ``[B|1, Hkv|1, G|1, bq|1, bk|1]``."""
    rows = slice(i0, i1) if mask.shape[2] > 1 else slice(None)  # a size-1 dim broadcasts: keep it whole
    cols = slice(j0, j1) if mask.shape[3] > 1 else slice(None)
    tile = mask[:, :, rows, cols]
    if tile.shape[1] == 1:
        return tile.unsqueeze(2)
    return tile.unflatten(1, (tile.shape[1] // groups, groups))


class _Workspace:
    """Tile buffers reused across iterations, one per shape (full and edge tiles), so the loop
    allocates nothing tile-sized: per-iteration allocations fragment the C heap and keep several
    stale tiles resident."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device, self.buffers = dtype, device, {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        key = (name, shape)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, dtype=self.dtype, device=self.device)
        return self.buffers[key]


def _forward(q, k, v, scale, masks: TileMasks, q_block: int, kv_block: int):
    B, Hkv, G, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    acc_dtype = lse_dtype(q.dtype)
    out = q.new_empty(B, Hkv, G, Nq, Dv)
    lse = torch.empty(B, Hkv, G, Nq, dtype=acc_dtype, device=q.device)
    work = _Workspace(acc_dtype, q.device)
    for i0 in range(0, Nq, q_block):
        i1 = min(i0 + q_block, Nq)
        bq = i1 - i0
        qi = work.get("q", B, Hkv, G, bq, D).copy_(q[:, :, :, i0:i1]).mul_(scale)
        row_max = work.get("max", B, Hkv, G, bq).fill_(float("-inf"))
        row_sum = work.get("sum", B, Hkv, G, bq).zero_()
        acc = work.get("acc", B, Hkv, G, bq, Dv).zero_()
        kv_end = masks.kv_end(i1, Nq, Nk)
        for j0 in range(0, kv_end, kv_block):
            j1 = min(j0 + kv_block, kv_end)
            kj = k[:, :, None, j0:j1].to(acc_dtype)  # (B, Hkv, 1, bk, D)
            vj = v[:, :, None, j0:j1].to(acc_dtype)
            scores = torch.matmul(qi, kj.transpose(-1, -2), out=work.get("s", B, Hkv, G, bq, j1 - j0))
            scores = masks.apply(scores, i0, i1, j0, j1, Nq, Nk, G)  # (B, Hkv, G, bq, bk)
            new_max = torch.maximum(row_max, scores.amax(dim=-1))
            safe_max = torch.where(torch.isfinite(new_max), new_max, 0.0)
            probs = scores.sub_(safe_max[..., None]).exp_()
            rescale = torch.exp(row_max - safe_max)
            row_sum.mul_(rescale).add_(probs.sum(dim=-1))
            acc.mul_(rescale[..., None]).add_(torch.matmul(probs, vj, out=work.get("pv", B, Hkv, G, bq, Dv)))
            row_max.copy_(new_max)
        nonempty = row_sum > 0
        out[:, :, :, i0:i1] = acc.div_(torch.where(nonempty, row_sum, 1.0)[..., None]).masked_fill_(
            ~nonempty[..., None], 0.0
        )
        lse[:, :, :, i0:i1] = torch.where(
            nonempty, row_max + torch.log(torch.where(nonempty, row_sum, 1.0)), float("-inf")
        )
    return out, lse


def _backward(q, k, v, out, lse, grad_out, grad_lse, scale, masks: TileMasks, q_block: int, kv_block: int):
    G, Nq, Nk = q.shape[2], q.shape[3], k.shape[2]
    acc_dtype = lse.dtype
    grad_q = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
    grad_v = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # d(loss)/d(score_ij) = p_ij * (dp_ij - delta_i) with delta_i = <dO_i, O_i> - dLSE_i.
    delta = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(dim=-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc_dtype)
    safe_lse = torch.where(torch.isfinite(lse), lse, 0.0)
    work = _Workspace(acc_dtype, q.device)
    for i0 in range(0, Nq, q_block):
        i1 = min(i0 + q_block, Nq)
        qi = q[:, :, :, i0:i1].to(acc_dtype) * scale
        doi = grad_out[:, :, :, i0:i1].to(acc_dtype)
        kv_end = masks.kv_end(i1, Nq, Nk)
        for j0 in range(0, kv_end, kv_block):
            j1 = min(j0 + kv_block, kv_end)
            kj = k[:, :, None, j0:j1].to(acc_dtype)
            vj = v[:, :, None, j0:j1].to(acc_dtype)
            tile = (*qi.shape[:-1], j1 - j0)
            scores = torch.matmul(qi, kj.transpose(-1, -2), out=work.get("s", *tile))
            scores = masks.apply(scores, i0, i1, j0, j1, Nq, Nk, G)
            probs = scores.sub_(safe_lse[:, :, :, i0:i1, None]).exp_()  # (B, Hkv, G, bq, bk)
            grad_v[:, :, j0:j1] += torch.einsum("bhgqk,bhgqd->bhkd", probs, doi)
            grad_probs = torch.matmul(doi, vj.transpose(-1, -2), out=work.get("dp", *tile))
            grad_scores = grad_probs.sub_(delta[:, :, :, i0:i1, None]).mul_(probs)
            grad_q[:, :, :, i0:i1] += (grad_scores @ kj) * scale
            grad_k[:, :, j0:j1] += torch.einsum("bhgqk,bhgqd->bhkd", grad_scores, qi)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, masks, q_block, kv_block):
        out, lse = _forward(q, k, v, scale, masks, q_block, kv_block)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, masks, q_block, kv_block)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = _backward(q, k, v, out, lse, grad_out, grad_lse, *ctx.args)
        return grad_q, grad_k, grad_v, None, None, None, None


def tiled_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    is_causal: bool = False,
    kv_mask: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    q_block: int = Q_BLOCK,
    kv_block: int = KV_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention with O(N * block) extra memory and an autograd backward.

    Args:
        query: `[B, Hq, Nq, D]`.
        key: `[B, Hkv, Nk, D]` with ``Hq % Hkv == 0``.
        value: `[B, Hkv, Nk, Dv]`.
        scale: multiplies the scores.
        is_causal: bottom-right aligned causal mask (query i sees key j iff j <= i + Nk - Nq).
        kv_mask: bool `[B, Nk]`, True for real keys.
        mask: bool, broadcastable to `[B, Hq, Nq, Nk]` with 4 dims, True where visible.
        bias: float, broadcastable to `[B, Hq, Nq, Nk]` with 4 dims, added to the scores.
        q_block: query rows per tile (a tuning knob, not part of the semantics). Default: `256`.
        kv_block: keys per block. Default: `256`.

    Returns:
        ``out [B, Hq, Nq, Dv]`` in the input dtype and ``lse [B, Hq, Nq]`` (float32, float64 for
        float64 inputs; ``-inf`` where a row sees no key, whose output is 0). Both are differentiable.
    """
    Hq, Hkv = query.shape[1], key.shape[1]
    q = query.unflatten(1, (Hkv, Hq // Hkv))  # (B, Hkv, G, Nq, D)
    masks = TileMasks(is_causal, kv_mask, mask, bias)
    out, lse = _TiledAttention.apply(q, key, value, scale, masks, q_block, kv_block)
    return out.flatten(1, 2), lse.flatten(1, 2)
