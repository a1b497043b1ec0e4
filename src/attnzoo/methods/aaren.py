"""``aaren``: softmax attention as an RNN (Feng et al., 2024, "Attention as (an) RNN").

One query token ``q`` per head (learned and input-independent in Aaren) attends every causal
prefix of the keys: with ``s_j = q . k_j * scale``, row ``i`` of the output is

    ``o_i = sum_{j <= i + Nk - Nq} softmax_j(s) v_j``

(bottom-right alignment; padded keys have ``s_j = -inf``; rows that see no key are 0 and their
log-sum-exp is ``-inf``). This is exact softmax attention of the repeated query under the causal
mask, so ``exact=True``; what makes it an RNN is that the query does not depend on the token.

Calling convention (``Method.shared_query``): ``query`` is ``[B, Hq, N, D]`` constant along the
sequence, e.g. ``token.expand(B, Hq, N, D)``; the method reads ``query[:, :, :1]`` (gradients reach
that row, hence the token through ``expand``) and refuses, naming ``query``, a query that varies
along the sequence. Causal only: without the mask every row would be the same.

The many-to-one RNN of the paper carries ``(m, c, a)`` = (running max of the scores,
``sum exp(s_j - m)``, ``sum exp(s_j - m) v_j``) and outputs ``a / c``; its combine is associative,
so the outputs of all prefixes come from a parallel prefix scan. The ``scan`` backend
(:func:`prefix_softmax`) works on the equivalent normalised pairs ``(lse, o)`` (``lse = m + log c``,
``o = a / c``), merged with weights ``exp(lse_part - lse) <= 1``, so no exponential of a positive
number is ever taken (scores of 1e4 are fine):

* within chunks of ``chunk_size`` keys, a masked ``[C, C]`` softmax gives every in-chunk prefix;
* the chunk totals are scanned by Hillis-Steele doubling (``log2(N / C)`` merges of ``[N / C]``
  tensors), and each chunk's exclusive prefix is merged into its rows.

Work O(N C Dv), memory O(N (C + Dv)) per head with plain autograd, no N x N tensor. Decoding keeps
the query token and ``(m, c, a)`` (float32, float64 for float64 inputs): O(Dv) per token whatever
the position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.lse import merge_attention_states
from ..kernels.masks import dense_visibility
from ..kernels.reference import lse_dtype, safe_logsumexp, softmax_reference
from ..params import MethodParams, param
from ..registry import AttentionOutput, Backend, Capabilities, Decoder, Method, Paper, register


@dataclass(frozen=True)
class AarenParams(MethodParams):
    chunk_size: int = param(64, "keys per chunk of the prefix scan (a [C, C] softmax per chunk)")

    def validate(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return lse_dtype(dtype)  # float32 for half inputs and float32, float64 for float64


def check_shared_query(query: Tensor) -> None:
    """Refuse a query that is not one token per head repeated along the sequence (dim 2)."""
    if query.shape[2] > 1 and not torch.equal(query, query[:, :, :1].expand_as(query)):
        raise ValueError(
            "query must be one token per head repeated along the sequence (aaren reads query[:, :, :1]); "
            "pass e.g. token.expand(B, H, N, D), got a query that varies along the sequence"
        )


def _check(call: AttentionCall, p: AarenParams) -> None:
    check_shared_query(call.query)


def reference(call: AttentionCall, p: AarenParams) -> AttentionOutput:
    """softmax(q_0 k^T * scale, causal and padding masks) @ v with the token q_0 = query[:, :, 0]
    for every row, every score materialised (the dense softmax reference)."""
    q = call.query[:, :, :1].expand_as(call.query)
    out, lse = softmax_reference(call.replace(query=q), dense_visibility(call))
    return AttentionOutput(out, lse if call.return_lse else None)


# -- the scan -------------------------------------------------------------------------------------


def _merge(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    """The associative combine of two partial attentions ``(o, lse)`` over disjoint keys."""
    return merge_attention_states([o1, o2], [l1, l2])


def _shift(x: Tensor, d: int, fill: float) -> Tensor:
    """``x`` moved ``d`` places along dim 2 (towards later positions), ``fill`` entering."""
    head = x.new_full((*x.shape[:2], d, *x.shape[3:]), fill)
    return torch.cat([head, x[:, :, :-d]], dim=2)


def prefix_softmax(
    scores: Tensor, value: Tensor, chunk_size: int = 64, initial: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Softmax attention of one query per head over every prefix of the keys, by a chunked scan.

    Args:
        scores: ``[B, H, G, N]`` (``G`` queries share each key/value head; ``-inf`` = no key),
            float32 or float64.
        value: ``[B, H, N, Dv]``, the dtype of ``scores``.
        chunk_size: keys per chunk ``C``: a ``[C, C]`` softmax per chunk, ``log2(N / C)`` merges.
        initial: ``(o [B, H, G, Dv], lse [B, H, G])`` of keys before these (decoding), or None.

    Returns:
        ``o [B, H, G, N, Dv]`` with ``o[..., t, :] = sum_{j <= t} softmax(scores[..., :t + 1])_j v_j``
        (merged with ``initial``; 0 where no key is seen) and ``lse [B, H, G, N]`` (``-inf`` there).
        Differentiable by plain autograd; no exponential of a positive number.
    """
    B, H, G, N = scores.shape
    Dv = value.shape[-1]
    C = max(1, min(chunk_size, N))
    n = -(-N // C)
    if n * C != N:
        scores = torch.nn.functional.pad(scores, (0, n * C - N), value=float("-inf"))
        value = torch.nn.functional.pad(value, (0, 0, 0, n * C - N))
    s = scores.view(B, H, G, n, C).transpose(2, 3).contiguous()  # [B, H, n, G, C]
    tril = torch.ones(C, C, dtype=torch.bool, device=s.device).tril()
    masked = torch.where(tril, s.unsqueeze(-2), float("-inf"))  # [B, H, n, G, C(row), C(key)]
    lse = safe_logsumexp(masked, dim=-1)  # every in-chunk prefix, [B, H, n, G, C]
    weights = torch.exp(masked - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.matmul(weights.view(B, H, n, G * C, C), value.view(B, H, n, C, Dv)).view(B, H, n, G, C, Dv)
    if n > 1 or initial is not None:
        # Exclusive prefix of every chunk: the scan of [initial, chunk 0, ..., chunk n-2].
        lo, ll = out[..., -1, :], lse[..., -1]  # chunk totals [B, H, n, G, Dv], [B, H, n, G]
        if initial is None:
            po, pl = _shift(lo, 1, 0.0), _shift(ll, 1, float("-inf"))
        else:
            po = torch.cat([initial[0].unsqueeze(2).to(lo.dtype), lo[:, :, :-1]], dim=2)
            pl = torch.cat([initial[1].unsqueeze(2).to(ll.dtype), ll[:, :, :-1]], dim=2)
        d = 1
        while d < n:  # Hillis-Steele: after the step for d, position c holds positions c-2d+1..c
            po, pl = _merge(_shift(po, d, 0.0), _shift(pl, d, float("-inf")), po, pl)
            d *= 2
        out, lse = _merge(po.unsqueeze(-2).expand_as(out), pl.unsqueeze(-1).expand_as(lse), out, lse)
    out = out.transpose(2, 3).reshape(B, H, G, n * C, Dv)[:, :, :, :N]
    return out, lse.transpose(2, 3).reshape(B, H, G, n * C)[..., :N]


def _scores(call: AttentionCall, key: Tensor, kv_mask: Tensor | None) -> Tensor:
    """``q_0 . k_j * scale`` as ``[B, Hkv, G, Nk]`` in the work dtype (no repeated keys)."""
    work = _work_dtype(call.dtype)
    q = call.query[:, :, 0].to(work).view(call.batch, call.kv_heads, call.groups, call.head_dim)
    s = torch.matmul(q, key.to(work).transpose(-1, -2)) * call.scale
    if kv_mask is not None:
        s = s.masked_fill(~kv_mask[:, None, None, :], float("-inf"))
    return s


def _rows(call: AttentionCall, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Per-key-position results ``[B, Hkv, G, Nk, ...]`` -> query rows ``[B, Hq, Nq, ...]``
    (bottom-right: row i is key position i + Nk - Nq; rows before the first key are empty)."""
    off = call.kv_len - call.q_len
    out, lse = out.flatten(1, 2), lse.flatten(1, 2)
    if off >= 0:
        out, lse = out[:, :, off:], lse[:, :, off:]
    else:
        out = torch.cat([out.new_zeros(*out.shape[:2], -off, out.shape[-1]), out], dim=2)
        lse = torch.cat([lse.new_full((*lse.shape[:2], -off), float("-inf")), lse], dim=2)
    return out, lse


def _run_scan(call: AttentionCall, p: AarenParams) -> AttentionOutput:
    work = _work_dtype(call.dtype)
    scores = _scores(call, call.key, call.kv_mask)
    out, lse = prefix_softmax(scores, call.value.to(work), p.chunk_size)
    out, lse = _rows(call, out, lse)
    return AttentionOutput(out.to(call.dtype), lse.to(lse_dtype(call.dtype)) if call.return_lse else None)


# -- decoding -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AarenState:
    """The RNN state. ``query [B, Hq, D]`` is the token (set by the first step, which also fixes
    ``Hq``); ``m``, ``c`` ``[B, Hq]`` and ``a [B, Hq, Dv]`` are the running max of the scores,
    ``sum exp(s - m)`` and ``sum exp(s - m) v`` (float32, float64 for float64 inputs; ``m = -inf``,
    ``c = 0``, ``a = 0`` before any key). ``sizes`` = (batch, kv_heads, head_dim, value_dim)."""

    sizes: tuple[int, int, int, int]
    dtype: torch.dtype
    device: torch.device
    query: Tensor | None = None
    m: Tensor | None = None
    c: Tensor | None = None
    a: Tensor | None = None

    def size_bytes(self) -> int:
        return sum(t.nbytes for t in (self.query, self.m, self.c, self.a) if t is not None)


def _init_state(batch, kv_heads, head_dim, value_dim, dtype, device, p: AarenParams) -> AarenState:
    return AarenState((batch, kv_heads, head_dim, value_dim), dtype, device)


def _step(call: AttentionCall, state: AarenState, p: AarenParams) -> tuple[AttentionOutput, AarenState]:
    """Absorb ``n_new`` tokens: their prefix scan started from the state, then the new state."""
    B, Hkv, D, Dv = state.sizes
    for name, t, last in (("key", call.key, D), ("value", call.value, Dv)):
        if tuple(t.shape[:2]) != (B, Hkv) or t.shape[-1] != last or t.dtype != state.dtype:
            raise ValueError(
                f"{name} {list(t.shape)} {t.dtype} does not match the state's [{B}, {Hkv}, n, {last}] {state.dtype}"
            )
    check_shared_query(call.query)
    token = call.query[:, :, 0]
    acc, Hq, G = _work_dtype(call.dtype), call.q_heads, call.groups
    if state.query is None:
        m = torch.full((B, Hq), float("-inf"), dtype=acc, device=call.device)
        c, a = torch.zeros_like(m), torch.zeros(B, Hq, Dv, dtype=acc, device=call.device)
    elif token.shape != state.query.shape or not torch.equal(token, state.query):
        raise ValueError(
            "query: aaren's query token must stay the same across decoding steps (it is the RNN's fixed "
            f"query), got a different token of shape {list(token.shape)}"
        )
    else:
        m, c, a = state.m, state.c, state.a
    empty = c == 0
    lse0 = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, 1.0, c)))
    o0 = a / torch.where(empty, 1.0, c)[..., None]
    scores = _scores(call, call.key, None)
    initial = (o0.view(B, Hkv, G, Dv), lse0.view(B, Hkv, G))
    out, lse = prefix_softmax(scores, call.value.to(acc), p.chunk_size, initial)
    m_new = torch.maximum(m, scores.amax(dim=-1).flatten(1, 2))
    seen = torch.isfinite(m_new)
    c_new = torch.where(seen, torch.exp(lse[..., -1].flatten(1, 2) - torch.where(seen, m_new, 0.0)), 0.0)
    a_new = c_new[..., None] * out[..., -1, :].flatten(1, 2)
    new = AarenState(state.sizes, state.dtype, state.device, token.detach().clone(), m_new, c_new, a_new)
    return AttentionOutput(out.flatten(1, 2).to(call.dtype)), new


AAREN = register(
    Method(
        name="aaren",
        family="linear",
        exact=True,
        summary=(
            "Attention as an RNN: one learned query token per head attends every causal prefix with exact "
            "softmax; all prefixes come from a parallel prefix scan over the associative (max, sum exp, "
            "sum exp * v) combine (chunked, stable in log space, O(N C d)), and decoding is an O(d) "
            "recurrent update per token. The query must be constant along the sequence."
        ),
        paper=Paper("Attention as an RNN (Feng et al., 2024)", "https://arxiv.org/abs/2405.13956"),
        capabilities=Capabilities(
            causal=True, noncausal=False, cross=True, gqa=True, kv_mask=True, lse=True, decode=True
        ),
        params=AarenParams,
        reference=reference,
        backends=(
            Backend(
                "scan",
                _run_scan,
                description="chunked parallel prefix scan of (lse, o) pairs: O(N C d), no N x N tensor",
            ),
        ),
        test_params=({}, {"chunk_size": 5}, {"chunk_size": 16}),
        decoder=Decoder(_init_state, _step),
        check=_check,
        shared_query=True,
        notes=(
            "exact=True: for its inputs (one query token per head) the output is exactly softmax attention "
            "under the causal mask, as the dense reference computes it."
        ),
    )
)

__all__ = ["AAREN", "AarenParams", "AarenState", "check_shared_query", "prefix_softmax"]
