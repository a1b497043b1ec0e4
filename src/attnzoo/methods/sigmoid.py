"""``sigmoid``: sigmoid self-attention (Ramapuram et al., 2024, "Theory, Analysis, and Best
Practices for Sigmoid Self-Attention").

    ``o_i = sum_j sigmoid(q_i . k_j * scale + b + attn_bias_ij) v_j``

over the keys query ``i`` sees (causal bottom-right ``j <= i + Nk - Nq``, ``kv_mask``, a boolean
``attn_mask``); a float ``attn_mask`` is added to the logits. There is no normalisation across
keys: hidden keys weigh 0, and a row that sees no key is 0. ``bias=None`` means ``b = -log(Nk)``,
the paper's recommendation (it keeps the initial output norm O(1)); it then depends on the number
of keys of the call, so causal decoding needs a fixed ``bias`` (``init_state`` refuses ``None``).

Family ``exact``: the full N x N pattern is computed with no approximation, by an IO-aware blocked
kernel (the sigmoid needs no running max, so query blocks are independent). ``exact=False``
because the registry's flag means "equals softmax attention", which sigmoid attention is not.

The ``blocked`` backend loops over blocks of query rows (each reading only the key prefix it needs
when causal, masking only the diagonal part) with a custom autograd Function that saves ``q``,
``k``, ``v`` and recomputes each block's weights in the backward (``dP = dO V^T``,
``dZ = dP s (1 - s)``, ``dQ = dZ K scale``, ``dK = dZ^T Q scale``, ``dV = s^T dO``): memory
O(N * block) instead of O(N^2). Grouped-query heads are folded into the rows, so keys and values
are never repeated. Half inputs are computed in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..inputs import AttentionCall
from ..kernels.masks import dense_visibility
from ..params import MethodParams, param
from ..registry import AttentionOutput, Backend, Capabilities, Decoder, Method, Paper, register
from .dense import KVCache, append_kv, bool_mask, float_mask, init_kv_cache, kv_cache_size

Q_BLOCK = 128


@dataclass(frozen=True)
class SigmoidParams(MethodParams):
    bias: float | None = param(None, "b added to every logit; None: -log(Nk) (the paper's choice)")

    def validate(self) -> None:
        if self.bias is not None and not math.isfinite(self.bias):
            raise ValueError(f"bias must be finite (or None for -log(Nk)), got {self.bias!r}")


def logit_bias(p: SigmoidParams, kv_len: int) -> float:
    """The ``b`` of a call with ``kv_len`` keys."""
    return -math.log(kv_len) if p.bias is None else p.bias


def reference(call: AttentionCall, p: SigmoidParams) -> AttentionOutput:
    """sigmoid(q k^T * scale + b + float attn_mask) @ v with hidden keys weighted 0, every logit
    materialised in the input dtype."""
    k = call.key.repeat_interleave(call.groups, dim=1)
    v = call.value.repeat_interleave(call.groups, dim=1)
    logits = torch.matmul(call.query, k.transpose(-1, -2)) * call.scale + logit_bias(p, call.kv_len)
    if float_mask(call) is not None:
        logits = logits + float_mask(call)
    weights = torch.sigmoid(logits)
    visible = dense_visibility(call)
    if visible is not None:
        weights = weights.masked_fill(~visible, 0.0)
    return AttentionOutput(torch.matmul(weights, v))


# -- the blocked kernel ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    """What every block needs: sizes, scale, bias, masks (``kv_mask [B, Nk]``, ``mask`` bool and
    ``attn_bias`` float, each 4-D broadcastable to ``[B, Hq, Nq, Nk]``)."""

    groups: int
    scale: float
    bias: float
    is_causal: bool
    q_block: int
    kv_mask: Tensor | None
    mask: Tensor | None

    def blocks(self, nq: int, nk: int):
        """``(r0, r1, kn)``: rows ``[r0, r1)`` read keys ``[0, kn)`` (``kn = 0``: no key visible)."""
        off = nk - nq
        for r0 in range(0, nq, self.q_block):
            r1 = min(nq, r0 + self.q_block)
            yield r0, r1, (max(0, min(nk, r1 + off)) if self.is_causal else nk)


def _by_group(t: Tensor, kv_heads: int, groups: int) -> Tensor:
    """A mask ``[B or 1, Hq or 1, rows, keys]`` as ``[B or 1, Hkv or 1, G or 1, rows, keys]``."""
    return t.unflatten(1, (kv_heads, groups)) if t.shape[1] != 1 else t.unsqueeze(2)


def _cut(t: Tensor, r0: int, r1: int, kn: int) -> Tensor:
    """Rows ``[r0, r1)`` and keys ``[0, kn)`` of a broadcastable 4-D mask."""
    t = t if t.shape[2] == 1 else t[:, :, r0:r1]
    return t if t.shape[3] == 1 else t[:, :, :, :kn]


def _weights(q5: Tensor, k: Tensor, attn_bias: Tensor | None, st: _Setup, r0: int, r1: int, kn: int):
    """``(q rows [B, Hkv, G*bq, D], weights [B, Hkv, G, bq, kn])`` of one block, 0 where hidden."""
    B, Hkv, G, nq, D = q5.shape
    qb = q5[:, :, :, r0:r1].reshape(B, Hkv, G * (r1 - r0), D)
    logits = torch.matmul(qb, k[:, :, :kn].transpose(-1, -2)).view(B, Hkv, G, r1 - r0, kn)
    logits = logits * st.scale + st.bias
    if attn_bias is not None:
        logits = logits + _by_group(_cut(attn_bias, r0, r1, kn), Hkv, G).to(logits.dtype)
    s = torch.sigmoid(logits)
    first = max(0, r0 + k.shape[2] - nq + 1)  # causal: the first key row r0 does not see
    if st.is_causal and first < kn:  # only the diagonal part needs the mask
        rows = torch.arange(r0, r1, device=s.device)[:, None] + (k.shape[2] - nq)
        hidden = torch.arange(first, kn, device=s.device)[None, :] > rows
        s[..., first:].masked_fill_(hidden, 0.0)
    if st.kv_mask is not None:
        s = s.masked_fill(~st.kv_mask[:, None, None, None, :kn], 0.0)
    if st.mask is not None:
        s = s.masked_fill(~_by_group(_cut(st.mask, r0, r1, kn), Hkv, G), 0.0)
    return qb, s


def _work(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _forward(q: Tensor, k: Tensor, v: Tensor, attn_bias: Tensor | None, st: _Setup) -> Tensor:
    B, Hq, nq, D = q.shape
    Hkv, nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    q5, k, v = _work(q).view(B, Hkv, st.groups, nq, D), _work(k), _work(v)
    out = torch.zeros(B, Hkv, st.groups, nq, Dv, dtype=q5.dtype, device=q.device)
    for r0, r1, kn in st.blocks(nq, nk):
        if kn == 0:
            continue
        _, s = _weights(q5, k, attn_bias, st, r0, r1, kn)
        ob = torch.matmul(s.view(B, Hkv, -1, kn), v[:, :, :kn])
        out[:, :, :, r0:r1] = ob.view(B, Hkv, st.groups, r1 - r0, Dv)
    return out.view(B, Hq, nq, Dv).to(q.dtype)


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``grad`` over the dims where ``shape`` broadcasts (size 1)."""
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def _backward(q, k, v, attn_bias, st: _Setup, grad_out: Tensor, bias_grad: bool):
    B, Hq, nq, D = q.shape
    Hkv, nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = st.groups
    q5, kw, vw = _work(q).view(B, Hkv, G, nq, D), _work(k), _work(v)
    go = _work(grad_out).reshape(B, Hkv, G, nq, Dv)
    dq = torch.zeros(B, Hkv, G, nq, D, dtype=q5.dtype, device=q.device)
    dk, dv = torch.zeros_like(kw), torch.zeros_like(vw)
    dbias = torch.zeros(attn_bias.shape, dtype=q5.dtype, device=q.device) if bias_grad else None
    for r0, r1, kn in st.blocks(nq, nk):
        if kn == 0:
            continue
        qb, s = _weights(q5, kw, attn_bias, st, r0, r1, kn)
        s4 = s.view(B, Hkv, -1, kn)
        gob = go[:, :, :, r0:r1].reshape(B, Hkv, -1, Dv)
        dz = torch.matmul(gob, vw[:, :, :kn].transpose(-1, -2)) * s4 * (1.0 - s4)  # 0 where hidden
        dq[:, :, :, r0:r1] = torch.matmul(dz, kw[:, :, :kn]).view(B, Hkv, G, r1 - r0, D) * st.scale
        dk[:, :, :kn] += torch.matmul(dz.transpose(-1, -2), qb) * st.scale
        dv[:, :, :kn] += torch.matmul(s4.transpose(-1, -2), gob)
        if dbias is not None:
            rows = slice(None) if dbias.shape[2] == 1 else slice(r0, r1)
            keys = slice(None) if dbias.shape[3] == 1 else slice(0, kn)
            dbias[:, :, rows, keys] += _reduce_to(dz.view(B, Hq, r1 - r0, kn), dbias.shape)
    grad_bias = dbias.to(attn_bias.dtype) if dbias is not None else None
    return dq.view(B, Hq, nq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), grad_bias


class _Blocked(torch.autograd.Function):
    """Sigmoid attention by query blocks; the backward recomputes each block from ``q, k, v``."""

    @staticmethod
    def forward(ctx, q, k, v, attn_bias, st):
        ctx.save_for_backward(q, k, v, attn_bias)
        ctx.setup = st
        return _forward(q, k, v, attn_bias, st)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, attn_bias = ctx.saved_tensors
        dq, dk, dv, dbias = _backward(q, k, v, attn_bias, ctx.setup, grad_out, ctx.needs_input_grad[3])
        return dq, dk, dv, dbias, None


def sigmoid_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    bias: float,
    is_causal: bool = False,
    kv_mask: Tensor | None = None,
    mask: Tensor | None = None,
    attn_bias: Tensor | None = None,
    q_block: int = Q_BLOCK,
) -> Tensor:
    """Sigmoid attention with O(N * q_block) extra memory and its own backward.

    Args:
        query: `[B, Hq, Nq, D]`.
        key: `[B, Hkv, Nk, D]` with ``Hq % Hkv == 0``.
        value: `[B, Hkv, Nk, Dv]`.
        scale: multiplies ``q . k``.
        bias: ``b``, added to every logit.
        is_causal: bottom-right aligned causal mask (query i sees key j iff j <= i + Nk - Nq).
        kv_mask: bool `[B, Nk]`, True for real keys.
        mask: bool, 4-D broadcastable to `[B, Hq, Nq, Nk]`, True where visible.
        attn_bias: float, 4-D broadcastable to `[B, Hq, Nq, Nk]`, added to the logits (it gets a
            gradient when it requires one).
        q_block: query rows per block (a tuning knob, not part of the semantics). Default: `128`.

    Returns:
        ``out [B, Hq, Nq, Dv]`` in the input dtype (float32 compute for half inputs); 0 for rows
        that see no key. Differentiable in ``query``, ``key``, ``value`` and ``attn_bias``.
    """
    if q_block < 1:
        raise ValueError(f"q_block must be >= 1, got {q_block}")
    st = _Setup(query.shape[1] // key.shape[1], scale, bias, is_causal, q_block, kv_mask, mask)
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    tensors = (q, k, v) + (() if attn_bias is None else (attn_bias,))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _Blocked.apply(q, k, v, attn_bias, st)
    return _forward(q, k, v, attn_bias, st)


def _run_blocked(call: AttentionCall, p: SigmoidParams) -> AttentionOutput:
    out = sigmoid_attention(
        call.query,
        call.key,
        call.value,
        scale=call.scale,
        bias=logit_bias(p, call.kv_len),
        is_causal=call.is_causal,
        kv_mask=call.kv_mask,
        mask=bool_mask(call),
        attn_bias=float_mask(call),
    )
    return AttentionOutput(out)


# -- decoding: a KV cache, as for dense attention ---------------------------------------------


def _init_kv_cache(batch, kv_heads, head_dim, value_dim, dtype, device, p: SigmoidParams) -> KVCache:
    if p.bias is None:
        raise ValueError(
            "bias: sigmoid decoding needs a fixed bias; bias=None means -log(Nk), which changes as the "
            "sequence grows (pass e.g. bias=-math.log(expected length))"
        )
    return init_kv_cache(batch, kv_heads, head_dim, value_dim, dtype, device)


def _step(call: AttentionCall, cache: KVCache, p: SigmoidParams) -> tuple[AttentionOutput, KVCache]:
    """Append the new keys and values, then attend with bottom-right causal alignment."""
    full, cache = append_kv(call, cache)
    return _run_blocked(full, p), cache


SIGMOID = register(
    Method(
        name="sigmoid",
        family="exact",
        exact=False,
        summary=(
            "Sigmoid self-attention: sigmoid(QK^T/sqrt(d) + b) V with no normalisation across keys, b = -log(N) "
            "by default. A blocked kernel in plain PyTorch (FlashSigmoid's idea: no running max, so query "
            "blocks are independent) with a recomputing backward: O(N * block) memory, every pair computed."
        ),
        paper=Paper(
            "Theory, Analysis, and Best Practices for Sigmoid Self-Attention (Ramapuram et al., 2024)",
            "https://arxiv.org/abs/2409.04431",
        ),
        capabilities=Capabilities(
            causal=True, noncausal=True, cross=True, gqa=True, kv_mask=True, attn_mask=True, decode=True
        ),
        params=SigmoidParams,
        reference=reference,
        backends=(
            Backend(
                "blocked",
                _run_blocked,
                description="query blocks with a recomputing backward, plain PyTorch: O(N * block) memory",
            ),
        ),
        test_params=({"bias": -2.0}, {"bias": -4.0}, {"bias": 0.5}),
        decoder=Decoder(_init_kv_cache, _step, kv_cache_size),
        notes=(
            "exact=False: the exact flag means 'equals softmax attention'; sigmoid attention is another "
            "function, computed here without approximation. bias=None (-log(Nk)) depends on the call's "
            "number of keys: a causal prefix then differs from the prefix of a longer call, and decoding "
            "needs a fixed bias."
        ),
    )
)

__all__ = ["SIGMOID", "SigmoidParams", "logit_bias", "sigmoid_attention"]
