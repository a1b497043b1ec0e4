"""``flowformer``: Flow-Attention (Wu et al., 2022, "Flowformer: Linearizing Transformers with
Conservation Flows"), following the official code (thuml/Flowformer, ``Flow_Attention`` and
``Flow_Attention_Causal``), with its ``eps`` convention.

Attention is a flow network from sources (keys/values) to sinks (queries) with capacities
``phi = sigmoid`` of the raw queries and keys (``scale`` is not used). Per batch element and query
head (a GQA group's heads share the key/value head but have their own flows), with ``e = eps``
(default 1e-6, added to every feature and every sum as in the official code) and ``a . b`` the dot
product over the head dim:

* **non-causal** (``N`` queries, ``M`` real keys):
  incoming flow ``I_i = (phi(q_i) + e) . (sum_j phi(k_j) + e)``,
  outgoing flow ``O_j = (phi(k_j) + e) . (sum_i phi(q_i) + e)``;
  conserved (refined) flows ``Î_i = (phi(q_i) + e) . (sum_j phi(k_j) / O_j + e)`` and
  ``Ô_j = min((phi(k_j) + e) . (sum_i phi(q_i) / I_i + e), clamp)``;
  competition ``c_j = M softmax_j(Ô)_j``; allocation ``sigmoid(Î_i N / M)``;
  ``o_i = sigmoid(Î_i N / M) (phi(q_i) / I_i) . sum_j phi(k_j) c_j v_j``.
* **causal** (every sum runs over the prefix, ``n^k_i`` = real keys ``j <= i``, ``n^q_j = j + 1``
  queries ``<= j``; the official code's "normal" counts, which rescale the prefix flows to the
  size of a full sequence):
  ``I_i = (phi(q_i) + e) . (sum_{j<=i} phi(k_j) + e)``, ``O_j = (phi(k_j) + e) . (sum_{i<=j} phi(q_i) + e)``,
  ``Î_i = (phi(q_i) + e) . (sum_{j<=i} phi(k_j) n^q_j / O_j + e) / n^k_i``,
  ``Ô_j = min((phi(k_j) + e) . (sum_{i<=j} phi(q_i) n^k_i / I_i + e) / n^q_j, clamp)``,
  ``c_j = n^k_j exp(Ô_j) / sum_{l<=j} exp(Ô_l)`` (each source competes with the sources before it:
  the softmax over the prefix ending at ``j``, fixed once ``j`` is seen, so nothing leaks),
  ``o_i = sigmoid(Î_i) (phi(q_i) / I_i) . sum_{j<=i} phi(k_j) c_j v_j``.

``clamp`` (default 1.0, the official code's "for stability"; ``None`` disables it) bounds the
conserved outgoing flows before the competition (``Ô >= 0``, so the official lower bound -1 never
acts). The competition is computed in log space (``logcumsumexp``, a running log normaliser in the
decoding state), so it stays finite without the clamp too, where ``Ô`` can reach ``1e13`` when
key features vanish. A padded key (``kv_mask``) is removed from every key-side sum, count and
softmax (as if it were not there); queries are never padded. A row with no real key is 0.

Backends: ``cumsum`` (O(N): prefix sums of ``[N, D]`` features for the flows, the final product
through the shared linear-attention core's chunked form); the reference is a token loop (causal)
or the materialised ``N x M`` weights (non-causal). Decoding keeps the prefix sums, the log
normaliser and the ``D x Dv`` state per query head: O(1) per token. Causal cross attention is not
defined (the causal flows pair query ``i`` with key ``i``); non-causal ``Nq != Nk`` is (the code
handles it), but the capability flags cannot enable it without also enabling causal cross.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.linear import linear_attention
from ..kernels.linear_state import LinearState, compute_dtype
from ..params import MethodParams, param
from ..registry import AttentionOutput, Backend, Capabilities, Decoder, Method, Paper, register


@dataclass(frozen=True)
class FlowParams(MethodParams):
    eps: float = param(1e-6, "added to every feature and flow sum (the paper's code: 1e-6)")
    clamp: float | None = param(1.0, "upper bound on the conserved outgoing flows before the competition; None: none")
    chunk_size: int = param(64, "tokens per chunk of the causal aggregation (the linear-attention core)")

    def validate(self) -> None:
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite float > 0, got {self.eps!r}")
        if self.clamp is not None and not (math.isfinite(self.clamp) and self.clamp > 0):
            raise ValueError(f"clamp must be a finite float > 0 or None, got {self.clamp!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


@dataclass(frozen=True)
class FlowState:
    """Causal Flow-Attention's decoding state, per batch element and query head: the prefix sums
    ``key_sum = sum m_j phi(k_j)``, ``query_sum = sum phi(q_i)``, ``key_out = sum m_j phi(k_j) n^q_j / O_j``,
    ``query_in = sum phi(q_i) n^k_i / I_i`` (``[B, H, D]``), ``log_norm = log sum_j exp(Ô_j)`` over
    the real keys (``[B, H]``, ``-inf`` before the first), ``state = sum phi(k_j) c_j v_j^T``
    (``[B, H, D, Dv]``), ``keys`` (real keys absorbed, ``[B]``) and ``length`` (tokens absorbed).
    Float32, or float64 for float64 inputs. An empty state has the key/value head count and takes
    the query head count at the first step."""

    state: Tensor
    key_sum: Tensor
    query_sum: Tensor
    key_out: Tensor
    query_in: Tensor
    log_norm: Tensor
    keys: Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, dim: int, value_dim: int, dtype: torch.dtype, device) -> FlowState:
        zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        vec = (batch, heads, dim)
        log_norm = torch.full((batch, heads), float("-inf"), dtype=dtype, device=device)
        return cls(zeros(*vec, value_dim), zeros(*vec), zeros(*vec), zeros(*vec), zeros(*vec), log_norm, zeros(batch))

    def tensors(self) -> list[Tensor]:
        return [self.state, self.key_sum, self.query_sum, self.key_out, self.query_in, self.log_norm, self.keys]

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _features(call: AttentionCall) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``phi(q) [B, Hq, N, D]``, ``phi(k) [B, Hq, M, D]`` and ``v [B, Hq, M, Dv]`` (key/value heads
    repeated over their query group) in the compute dtype, and ``real [B, 1, M]`` (1 = a real key)."""
    ct = compute_dtype(call.dtype)
    fq, fk = torch.sigmoid(call.query.to(ct)), torch.sigmoid(call.key.to(ct))
    v = call.value.to(ct)
    if call.groups > 1:
        fk, v = fk.repeat_interleave(call.groups, dim=1), v.repeat_interleave(call.groups, dim=1)
    if call.kv_mask is None:
        real = torch.ones(call.batch, 1, call.kv_len, dtype=ct, device=call.device)
    else:
        real = call.kv_mask[:, None].to(ct)
    return fq, fk, v, real


def _dot(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """``(a + eps) . (b + eps)`` over the last dim."""
    return ((a + eps) * (b + eps)).sum(-1)


def _scan(fq: Tensor, fk: Tensor, v: Tensor, real: Tensor, st: FlowState, p: FlowParams) -> tuple[Tensor, FlowState]:
    """Causal Flow-Attention over ``N`` new tokens after ``st``, with prefix sums: O(N D Dv)."""
    e, n = p.eps, fq.shape[2]
    mk = fk * real[..., None]  # padded keys carry no flow
    key_sum = st.key_sum[:, :, None] + mk.cumsum(2)
    query_sum = st.query_sum[:, :, None] + fq.cumsum(2)
    n_k = st.keys[:, None, None] + real.cumsum(2)  # [B, 1, N] real keys up to each position
    n_q = st.length + torch.arange(1, n + 1, dtype=fq.dtype, device=fq.device)
    incoming, outgoing = _dot(fq, key_sum, e), _dot(fk, query_sum, e)  # I, O: [B, H, N]
    key_out = st.key_out[:, :, None] + (mk * (n_q / outgoing)[..., None]).cumsum(2)
    query_in = st.query_in[:, :, None] + (fq * (n_k / incoming)[..., None]).cumsum(2)
    sink = _dot(fq, key_out, e) / n_k.clamp(min=1)
    source = _dot(fk, query_in, e) / n_q
    if p.clamp is not None:
        source = source.clamp(max=p.clamp)
    # competition over each source's prefix, in log space; padded keys get the lowest finite logit
    logits = torch.where(real > 0, source, torch.finfo(fq.dtype).min)
    log_norm = torch.logcumsumexp(logits, dim=2)
    if st.length:
        log_norm = torch.logaddexp(st.log_norm[..., None], log_norm)
    competition = torch.where(real > 0, n_k * torch.exp(logits - log_norm), 0.0)
    out, kv = linear_attention(
        fq,
        mk,
        v * competition[..., None],
        causal=True,
        initial_state=LinearState(st.state, None, st.length),
        form="chunk",
        chunk_size=p.chunk_size,
    )
    out = out * (torch.sigmoid(sink) / incoming)[..., None]
    last = lambda t: t[:, :, -1]  # noqa: E731
    new = FlowState(
        kv.state,
        last(key_sum),
        last(query_sum),
        last(key_out),
        last(query_in),
        torch.where(st.keys[:, None] + real.sum(2) > 0, last(log_norm), st.log_norm),
        n_k[:, 0, -1],
        st.length + n,
    )
    return out, new


def _loop(fq: Tensor, fk: Tensor, v: Tensor, real: Tensor, st: FlowState, p: FlowParams) -> Tensor:
    """Causal Flow-Attention token by token from the definition (the reference)."""
    e = p.eps
    S, ks, qs, ko, qi, log_norm, nk = st.tensors()
    nk = nk[:, None]  # [B, 1]
    outs = []
    for t in range(fq.shape[2]):
        m, f_q, f_k = real[:, :, t], fq[:, :, t], fk[:, :, t]  # [B, 1], [B, H, D], [B, H, D]
        nq = st.length + t + 1
        ks, qs, nk = ks + m[..., None] * f_k, qs + f_q, nk + m
        incoming, outgoing = _dot(f_q, ks, e), _dot(f_k, qs, e)
        ko = ko + m[..., None] * f_k * (nq / outgoing)[..., None]
        qi = qi + f_q * (nk / incoming)[..., None]
        sink = _dot(f_q, ko, e) / nk.clamp(min=1)
        source = _dot(f_k, qi, e) / nq
        if p.clamp is not None:
            source = source.clamp(max=p.clamp)
        log_norm = torch.where(m > 0, torch.logaddexp(log_norm, source), log_norm)
        c = torch.where(m > 0, nk * torch.exp(torch.where(m > 0, source - log_norm, 0.0)), 0.0)
        S = S + (m[..., None] * f_k)[..., :, None] * (c[..., None] * v[:, :, t])[..., None, :]
        read = (f_q[..., None, :] @ S)[..., 0, :]
        outs.append(read * (torch.sigmoid(sink) / incoming)[..., None])
    return torch.stack(outs, dim=2)


def _noncausal(fq: Tensor, fk: Tensor, v: Tensor, real: Tensor, p: FlowParams, dense: bool) -> Tensor:
    """Non-causal Flow-Attention; ``dense`` materialises the ``N x M`` weights (the reference)."""
    e, n = p.eps, fq.shape[2]
    mk = fk * real[..., None]
    n_k = real.sum(-1, keepdim=True)  # [B, 1, 1] real keys
    incoming = _dot(fq, mk.sum(2, keepdim=True), e)  # [B, H, N]
    outgoing = _dot(fk, fq.sum(2, keepdim=True), e)  # [B, H, M]
    sink = _dot(fq, (mk / outgoing[..., None]).sum(2, keepdim=True), e)
    source = _dot(fk, (fq / incoming[..., None]).sum(2, keepdim=True), e)
    if p.clamp is not None:
        source = source.clamp(max=p.clamp)
    logits = torch.where(real > 0, source, torch.finfo(fq.dtype).min)
    competition = torch.softmax(logits, dim=-1) * real * n_k  # 0 for padded keys (and all of a key-less row)
    allocation = torch.sigmoid(sink * n / n_k.clamp(min=1))
    values = v * competition[..., None]
    if dense:  # the weights w_ij = phi(q_i) . phi(k_j) / I_i
        return (((fq @ mk.mT) / incoming[..., None]) @ values) * allocation[..., None]
    return ((fq @ (mk.mT @ values)) / incoming[..., None]) * allocation[..., None]


def _empty(call: AttentionCall, heads: int) -> FlowState:
    ct = compute_dtype(call.dtype)
    return FlowState.empty(call.batch, heads, call.head_dim, call.value_dim, ct, call.device)


def reference(call: AttentionCall, p: FlowParams) -> AttentionOutput:
    """Flow-Attention from its definition: causal, a loop over tokens updating the prefix sums;
    non-causal, the ``N x M`` weights materialised."""
    fq, fk, v, real = _features(call)
    if call.is_causal:
        out = _loop(fq, fk, v, real, _empty(call, call.q_heads), p)
    else:
        out = _noncausal(fq, fk, v, real, p, dense=True)
    return AttentionOutput(out.to(call.dtype))


def cumsum(call: AttentionCall, p: FlowParams) -> AttentionOutput:
    fq, fk, v, real = _features(call)
    if call.is_causal:
        out = _scan(fq, fk, v, real, _empty(call, call.q_heads), p)[0]
    else:
        out = _noncausal(fq, fk, v, real, p, dense=False)
    return AttentionOutput(out.to(call.dtype))


def _init_state(batch, kv_heads, head_dim, value_dim, dtype, device, p: FlowParams) -> FlowState:
    return FlowState.empty(batch, kv_heads, head_dim, value_dim, compute_dtype(dtype), device)


def _step(call: AttentionCall, st: FlowState, p: FlowParams) -> tuple[AttentionOutput, FlowState]:
    if st.key_sum.shape[1] != call.q_heads:
        if st.length:
            raise ValueError(f"query: the state holds {st.key_sum.shape[1]} query heads, got {call.q_heads}")
        st = _empty(call, call.q_heads)
    expected = [call.batch, call.q_heads, call.head_dim, call.value_dim]
    if list(st.state.shape) != expected or st.state.dtype != compute_dtype(call.dtype):
        raise ValueError(
            f"state: expected {compute_dtype(call.dtype)} {expected}, got {st.state.dtype} {list(st.state.shape)}"
        )
    fq, fk, v, real = _features(call)
    out, new = _scan(fq, fk, v, real, st, p)
    return AttentionOutput(out.to(call.dtype)), new


FLOWFORMER = register(
    Method(
        name="flowformer",
        family="linear",
        exact=False,
        summary=(
            "Flow-Attention: sigmoid features as flow capacities from sources (keys) to sinks (queries); "
            "conserved incoming/outgoing flows give a competition among sources (softmax of their outgoing "
            "flows, times their number) and an allocation per sink (sigmoid of its incoming flow) around a "
            "normalised linear attention. O(N) by prefix sums; causal with prefix-only flows and "
            "competition, decoded in O(1) per token."
        ),
        paper=Paper(
            "Flowformer: Linearizing Transformers with Conservation Flows (Wu et al., 2022)",
            "https://arxiv.org/abs/2202.06258",
        ),
        capabilities=Capabilities(causal=True, noncausal=True, cross=False, gqa=True, kv_mask=True, decode=True),
        params=FlowParams,
        reference=reference,
        query_mixing=True,  # the sources' competition sums over the (earlier) queries' flows
        backends=(Backend("cumsum", cumsum, description="prefix sums for the flows, chunked core: O(N d^2)"),),
        test_params=({}, {"clamp": None, "chunk_size": 16}, {"eps": 1e-3, "chunk_size": 5}),
        decoder=Decoder(_init_state, _step),
        notes=(
            "The reference is a token loop (causal) or the materialised N x M weights (non-causal). "
            "scale is not used. Non-causal cross attention is implemented but not enabled: the capability "
            "flags cannot enable it without causal cross attention, which Flow-Attention does not define."
        ),
    )
)

__all__ = ["FLOWFORMER", "FlowParams", "FlowState"]
