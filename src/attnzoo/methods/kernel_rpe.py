"""``kernel_rpe``: kernelised attention with a relative positional encoding, computed with the FFT
(Luo et al., 2021, "Stable, Fast and Accurate: Kernelized Attention with Relative Positional
Encoding").

``o_i = sum_j phi(q_i).phi(k_j) exp(b_{p_i - j}) v_j / sum_j phi(q_i).phi(k_j) exp(b_{p_i - j})``
over the visible keys, where query ``i`` sits at position ``p_i = i + Nk - Nq`` (bottom-right
alignment) and sees the keys ``j <= p_i`` (causal) or every key (non-causal); padding keys
(``kv_mask``) never count. A zero denominator gives a zero row.

* ``b`` is ``rpe [Hq or 1, 2L - 1]``: the bias of each query head (or one shared by all) for the
  offsets ``-(L-1)..(L-1)``, index ``L - 1`` being offset 0; ``L >= max(Nq, Nk)``. ``None`` means
  ``b = 0``: plain normalised linear attention with the same features.
* ``phi`` (``feature_map``): ``"performer"`` (the paper's choice), FAVOR+ positive orthogonal random
  features of ``q' = q sign(scale) |scale|^0.5`` and ``k' = k |scale|^0.5`` with ``num_features``
  features drawn from ``seed`` (or an explicit ``projection``), exactly as in
  :mod:`attnzoo.methods.performer`; ``"elu"`` (``elu(x) + 1``) or ``"relu"`` on the raw inputs (the
  scale cancels in the normalisation).

Exact rescalings keep the numbers representable (performer features): the bias is shifted by its
maximum, each key's features are divided by ``exp`` of their own maximum ``c_j``, folded back in as
``exp(c_j - m_i)`` with ``m_i`` the largest ``c`` among row ``i``'s visible real keys, and each query
row by the factor of :func:`attnzoo.methods.performer.query_features` (from its visible keys'
feature sums); the row factors cancel in the normalisation. A denominator that underflows (or is 0)
gives a zero row. No row ever reads a key it cannot see, so causal rows
never depend on later keys, not even through rounding.

The weights ``exp(b_{i-j})`` form a Toeplitz matrix, so the numerator and the denominator are
Toeplitz products of the ``F x (Dv + 1)`` channels ``phi(k_j) [v_j, 1]``. The ``fft`` backend computes
them with real FFTs along the sequence: non-causal, one product over all keys, ``O(N log N F Dv)``;
causal, a divide and conquer that keeps the triangular structure exact: pairs inside aligned
blocks of ``block_size`` positions are computed directly, and each block of keys of size ``s``
reaches the ``s`` rows after it through one FFT of size ``2s`` (doubling ``s``), ``O(N log(N) log(N /
block_size) F Dv)``. The reference materialises the ``[Nq, Nk]`` weights. FFTs run in float64 for
float64 inputs and float32 otherwise. Decoding keeps every key's features and value (the bias does
not factor through a fixed-size state): ``O(n (F + Dv))`` memory and time per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.features import feature_map as simple_feature_map
from ..kernels.linear_state import compute_dtype
from ..params import MethodParams, param
from ..registry import AttentionOutput, Backend, Capabilities, Decoder, Method, Paper, register
from .performer import (
    check_projection,
    key_log_mass,
    last_visible,
    performer_log_features,
    projection_for,
    query_features,
    scaled_inputs,
)


@dataclass(frozen=True)
class KernelRPEParams(MethodParams):
    rpe: Tensor | None = param(  # noqa: RUF009
        None, "bias b [Hq or 1, 2L - 1] for offsets -(L-1)..(L-1) (index L-1: offset 0), L >= max(Nq, Nk); None: 0"
    )
    feature_map: Literal["performer", "elu", "relu"] = param(
        "performer", "phi: FAVOR+ positive random features (the paper's), elu(x) + 1 or relu"
    )
    num_features: int = param(64, "performer: random features per head (ignored when projection is given)")
    seed: int = param(0, "performer: seed of the orthogonal random projection")
    projection: Tensor | None = param(  # noqa: RUF009
        None, "performer: explicit projection W [m, D] (overrides num_features, seed)"
    )
    block_size: int = param(64, "fft, causal: positions per block computed directly; FFTs over doubling blocks")

    def validate(self) -> None:
        if self.num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {self.num_features}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


# -- features, bias and the row reference -------------------------------------------------------


def features(call: AttentionCall, p: KernelRPEParams) -> tuple[Tensor, Tensor, Tensor]:
    """``(q [B, Hq, Nq, F], k [B, Hkv, Nk, F], c [B, Hkv, Nk])`` in the compute dtype with
    ``phi(k_j) = k_j exp(c_j)`` and ``phi(q_i)`` up to a row factor; padding keys are 0, ``c = -inf``.
    Performer features: ``c_j`` is key ``j``'s largest log-feature and the query row factor is
    :func:`~attnzoo.methods.performer.query_features`' (from the visible keys' feature sums, the
    bias left out), so the denominators stay representable."""
    ct = compute_dtype(call.dtype)
    real = None if call.kv_mask is None else call.kv_mask[:, None, :]
    if p.feature_map != "performer":
        q = simple_feature_map(p.feature_map, call.query.to(ct))
        k = simple_feature_map(p.feature_map, call.key.to(ct))
        c = k.new_zeros(k.shape[:3])
        if real is None:
            return q, k, c
        return q, k * real[..., None].to(ct), c.masked_fill(~real, -math.inf)
    W = projection_for(p.num_features, p.seed, p.projection, call)
    qs, ks = scaled_inputs(call)
    logs = performer_log_features(ks, W)
    c = logs.detach().amax(dim=-1)
    if real is not None:
        c = c.masked_fill(~real, -math.inf)
    dead = torch.isinf(c)[..., None]
    k = torch.exp((logs - _finite_or_zero(c)[..., None]).masked_fill(dead, -math.inf))
    mass = key_log_mass(logs.detach().masked_fill(dead, -math.inf), call.is_causal, call.q_len)
    if call.is_causal:
        rows = _finite_or_zero(c.cummax(dim=-1).values)[:, :, last_visible(call.kv_len, call.q_len, call.device)]
    else:
        rows = _finite_or_zero(c.amax(dim=-1, keepdim=True))
    return query_features(performer_log_features(qs, W), mass - rows[..., None]), k, c


def log_bias(rpe: Tensor | None, length: int, ct: torch.dtype, device: torch.device) -> Tensor:
    """``b - max(b)`` per head: ``[Hb, 2L - 1]`` (zeros ``[1, 2 length - 1]`` without ``rpe``)."""
    if rpe is None:
        return torch.zeros(1, 2 * length - 1, dtype=ct, device=device)
    b = rpe.to(ct)
    return b - b.detach().amax(dim=-1, keepdim=True)


def _bias_at(log_b: Tensor, offsets: Tensor) -> Tensor:
    """``log_b`` at integer ``offsets`` (any shape) -> ``[Hb, *offsets.shape]``; outside the
    table ``-inf`` (such pairs are padding)."""
    size = log_b.shape[-1]
    index = (size - 1) // 2 + offsets
    inside = (index >= 0) & (index < size)
    return log_b[:, index.clamp(0, size - 1)].masked_fill(~inside, -math.inf)


def _heads(x: Tensor, kv_heads: int) -> Tensor:
    """A per-head table ``[Hb, ...]`` as ``[Hkv, G, ...]`` (``Hb = Hq``) or ``[1, 1, ...]`` (``Hb = 1``)."""
    return x.view(kv_heads, -1, *x.shape[1:]) if x.shape[0] > 1 else x.view(1, 1, *x.shape[1:])


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


def _inverse(den: Tensor) -> Tensor:
    """``1 / den``, 0 where ``den`` is 0 or subnormal (a row that sees, numerically, nothing)."""
    zero = den.abs() < torch.finfo(den.dtype).tiny
    return torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, den))


def _finish(num: Tensor, batch: int, q_heads: int) -> Tensor:
    """``num [B, Hkv, G, N, Dv + 1]`` (last column the denominator) -> ``[B, Hq, N, Dv]``."""
    out = num[..., :-1] * _inverse(num[..., -1])[..., None]
    return out.reshape(batch, q_heads, out.shape[-2], out.shape[-1])


def _with_ones(v: Tensor) -> Tensor:
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


# -- the dense definition (reference, decoding) -------------------------------------------------


def dense(q: Tensor, k: Tensor, c: Tensor, v: Tensor, log_b: Tensor, causal: bool) -> Tensor:
    """Every weight ``w_ij = (q_i . k_j) exp(c_j - m_i + b_{p_i - j})`` materialised, bottom-right
    aligned; ``m_i`` is the largest ``c`` among row ``i``'s visible keys. Returns ``[B, Hq, Nq, Dv]``."""
    B, Hq, Nq, F = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    offsets = (torch.arange(Nq, device=q.device) + Nk - Nq)[:, None] - torch.arange(Nk, device=q.device)
    if causal:
        running = _finite_or_zero(c.cummax(dim=-1).values)
        m = running[..., (offsets[:, 0]).clamp(0, Nk - 1)]  # rows before the first key see nothing
    else:
        m = _finite_or_zero(c.amax(dim=-1, keepdim=True)).expand(B, Hk, Nq)
    log_w = c[:, :, None, None, :] - m[:, :, None, :, None] + _heads(_bias_at(log_b, offsets), Hk)
    if causal:
        log_w = log_w.masked_fill(offsets < 0, -math.inf)
    scores = q.view(B, Hk, Hq // Hk, Nq, F) @ k[:, :, None].mT
    w = scores * torch.exp(log_w)
    num = w @ _with_ones(v)[:, :, None]
    return _finish(num, B, Hq)


def reference(call: AttentionCall, p: KernelRPEParams) -> AttentionOutput:
    """The ``[Nq, Nk]`` weights phi(q_i).phi(k_j) exp(b_{i-j}) materialised (masked), then
    ``W V / W 1`` (a zero denominator gives a zero row)."""
    q, k, c = features(call, p)
    log_b = log_bias(p.rpe, max(call.q_len, call.kv_len), q.dtype, call.device)
    out = dense(q, k, c, call.value.to(q.dtype), log_b, call.is_causal)
    return AttentionOutput(out.to(call.dtype))


# -- the FFT path -------------------------------------------------------------------------------


def _channels(k: Tensor, v1: Tensor) -> Tensor:
    """``k [..., n, F]`` and ``v1 [..., n, Dv + 1]`` -> the outer products ``[..., n, F (Dv + 1)]``."""
    return (k[..., :, None] * v1[..., None, :]).flatten(-2)


def _read(q: Tensor, y: Tensor, value_cols: int) -> Tensor:
    """``sum_f q_f y_f``: ``q [..., n, F]``, ``y [..., n, F (Dv + 1)]`` -> ``[..., n, Dv + 1]``."""
    y = y.unflatten(-1, (q.shape[-1], value_cols))
    return (q[..., None, :] @ y).squeeze(-2)


def _fft_size(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _noncausal_fft(q: Tensor, k: Tensor, c: Tensor, v1: Tensor, log_b: Tensor) -> Tensor:
    """One Toeplitz product: offsets ``d = p_i - j`` run over ``[1 - Nq, Nk - 1]``."""
    B, Hq, Nq, F = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    top = c.amax(dim=-1, keepdim=True)
    x = _channels(k * torch.exp(c - _finite_or_zero(top))[..., None], v1)[:, :, None]  # [B, Hk, 1, Nk, C]
    span = Nq + Nk - 1
    n = _fft_size(span)
    kernel = torch.exp(_bias_at(log_b, torch.arange(1 - Nq, Nk, device=q.device)))  # [Hb, span]
    spectrum = _heads(torch.fft.rfft(kernel, n=n), Hk)[..., None]  # [Hk | 1, G | 1, n/2 + 1, 1]
    y = torch.fft.irfft(torch.fft.rfft(x, n=n, dim=-2) * spectrum, n=n, dim=-2)[..., Nk - 1 : Nk - 1 + Nq, :]
    return _read(q.view(B, Hk, Hq // Hk, Nq, F), y, v1.shape[-1])


def _causal_fft(q: Tensor, k: Tensor, c: Tensor, v1: Tensor, log_b: Tensor, block: int) -> Tensor:
    """Square causal problem (``q`` aligned to the ``Nk`` key positions): base blocks directly, then
    at each level keys ``[2ms, 2ms + s)`` reach rows ``[2ms + s, 2ms + 2s)`` through one FFT of size
    ``2s``. Every row reads only keys at or before it."""
    B, _, n, F = q.shape
    Hk, G, cols = k.shape[1], q.shape[1] // k.shape[1], v1.shape[-1]
    b0 = min(block, n)
    size = b0
    while size < n:
        size *= 2
    pad = size - n
    q = torch.nn.functional.pad(q, (0, 0, 0, pad)).reshape(B, Hk, G, size, F)
    k = torch.nn.functional.pad(k, (0, 0, 0, pad))
    v1 = torch.nn.functional.pad(v1, (0, 0, 0, pad))
    c = torch.nn.functional.pad(c, (0, pad), value=-math.inf)
    m = _finite_or_zero(c.cummax(dim=-1).values)  # [B, Hk, size]: each row's reference
    nb = size // b0
    # pairs within a base block, directly
    pos = torch.arange(b0, device=q.device)
    offsets = pos[:, None] - pos[None, :]
    log_w = c.reshape(B, Hk, 1, nb, 1, b0) - m.reshape(B, Hk, 1, nb, b0, 1)
    log_w = (log_w + _heads(_bias_at(log_b, offsets), Hk)[:, :, None]).masked_fill(offsets < 0, -math.inf)
    scores = q.reshape(B, Hk, G, nb, b0, F) @ k.reshape(B, Hk, 1, nb, b0, F).mT
    num = ((scores * torch.exp(log_w)) @ v1.reshape(B, Hk, 1, nb, b0, cols)).reshape(B, Hk, G, size, cols)
    s = b0
    while s < size:
        M = size // (2 * s)
        cJ = c.reshape(B, Hk, M, 2, s)[:, :, :, 0]
        top = cJ.amax(dim=-1, keepdim=True)  # [B, Hk, M, 1]
        kJ = k.reshape(B, Hk, M, 2, s, F)[:, :, :, 0] * torch.exp(cJ - _finite_or_zero(top))[..., None]
        x = _channels(kJ, v1.reshape(B, Hk, M, 2, s, cols)[:, :, :, 0])[:, :, None]  # [B, Hk, 1, M, s, C]
        kernel = torch.exp(_bias_at(log_b, torch.arange(1, 2 * s, device=q.device)))  # offsets 1 .. 2s - 1
        spectrum = _heads(torch.fft.rfft(kernel, n=2 * s), Hk)[:, :, None, :, None]
        y = torch.fft.irfft(torch.fft.rfft(x, n=2 * s, dim=-2) * spectrum, n=2 * s, dim=-2)[..., s - 1 : 2 * s - 1, :]
        part = _read(q.reshape(B, Hk, G, M, 2, s, F)[:, :, :, :, 1], y, cols)  # [B, Hk, G, M, s, Dv + 1]
        mI = m.reshape(B, Hk, M, 2, s)[:, :, :, 1]
        factor = torch.where(torch.isfinite(top), torch.exp(_finite_or_zero(top) - mI), 0.0)  # <= 1
        part = part * factor[:, :, None, :, :, None]
        num = num + torch.stack([torch.zeros_like(part), part], dim=4).reshape(B, Hk, G, size, cols)
        s *= 2
    return num[:, :, :, :n]


def fft_runner(call: AttentionCall, p: KernelRPEParams) -> AttentionOutput:
    """Toeplitz products by real FFTs: non-causal one product, causal a divide and conquer."""
    q, k, c = features(call, p)
    v1 = _with_ones(call.value.to(q.dtype))
    log_b = log_bias(p.rpe, max(call.q_len, call.kv_len), q.dtype, call.device)
    B, Hq = call.batch, call.q_heads
    if not call.is_causal:
        return AttentionOutput(_finish(_noncausal_fft(q, k, c, v1, log_b), B, Hq).to(call.dtype))
    off = call.kv_len - call.q_len
    aligned = torch.nn.functional.pad(q, (0, 0, off, 0)) if off > 0 else q[:, :, -off:]
    num = _causal_fft(aligned, k, c, v1, log_b, p.block_size)
    num = num[:, :, :, off:] if off > 0 else torch.nn.functional.pad(num, (0, 0, -off, 0))
    return AttentionOutput(_finish(num, B, Hq).to(call.dtype))


# -- checks, decoding, registration -------------------------------------------------------------


def check_rpe(rpe: Tensor | None, q_heads: int, length: int, device: torch.device) -> None:
    """``rpe`` is a finite floating ``[Hq or 1, 2L - 1]`` tensor on ``device`` with ``L >= length``."""
    if rpe is None:
        return
    if rpe.dim() != 2 or rpe.shape[0] not in (1, q_heads) or rpe.shape[1] % 2 == 0:
        raise ValueError(
            f"rpe must have shape [Hq or 1, 2L - 1] (Hq = {q_heads}, an odd number of offsets), got {list(rpe.shape)}"
        )
    if (rpe.shape[1] + 1) // 2 < length:
        raise ValueError(
            f"rpe covers offsets up to {(rpe.shape[1] - 1) // 2} (L = {(rpe.shape[1] + 1) // 2}), but positions "
            f"reach {length - 1}: L must be >= {length}"
        )
    if not rpe.is_floating_point() or rpe.device != device:
        raise ValueError(f"rpe must be a floating tensor on {device}, got {rpe.dtype} on {rpe.device}")
    if not bool(torch.isfinite(rpe).all()):
        raise ValueError("rpe must be finite")


def check(call: AttentionCall, p: KernelRPEParams) -> None:
    """The projection and the bias table (its length covers the call)."""
    check_projection(p.projection, call)
    check_rpe(p.rpe, call.q_heads, max(call.q_len, call.kv_len), call.device)


def sample_params(call: AttentionCall, gen: torch.Generator) -> dict[str, Tensor]:
    """A random bias per query head covering the call, ``0.5 N(0, 1)`` per offset."""
    length = max(call.q_len, call.kv_len)
    return {"rpe": (0.5 * torch.randn(call.q_heads, 2 * length - 1, generator=gen)).to(call.device)}


@dataclass(frozen=True, eq=False)
class KeyCache:
    """kernel_rpe's decoding state: every key's features ``[B, Hkv, n, F]`` (``phi(k_j) = features_j
    exp(log_scale_j)``), their ``log_scale [B, Hkv, n]``, the values ``[B, Hkv, n, Dv]`` (compute
    dtype) and ``length = n``. It grows by ``F + Dv + 1`` numbers per token and kv head."""

    features: Tensor
    log_scale: Tensor
    value: Tensor
    length: int = 0

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.features, self.log_scale, self.value))

    def detach(self) -> KeyCache:
        return replace(self, features=self.features.detach(), value=self.value.detach())


def _feature_dim(head_dim: int, p: KernelRPEParams) -> int:
    if p.feature_map != "performer":
        return head_dim
    return p.num_features if p.projection is None else p.projection.shape[0]


def _init_state(batch, kv_heads, head_dim, value_dim, dtype, device, p: KernelRPEParams) -> KeyCache:
    ct = compute_dtype(dtype)
    empty = lambda *s: torch.zeros(batch, kv_heads, 0, *s, dtype=ct, device=device)  # noqa: E731
    return KeyCache(empty(_feature_dim(head_dim, p)), empty(), empty(value_dim), 0)


def _step(call: AttentionCall, state: KeyCache, p: KernelRPEParams) -> tuple[AttentionOutput, KeyCache]:
    total = state.length + call.kv_len
    check_rpe(p.rpe, call.q_heads, total, call.device)
    q, k, c = features(call, p)
    if state.features.shape[-1] != k.shape[-1] or state.value.dtype != q.dtype:
        raise ValueError("state: the decoding state does not match these inputs (feature count or dtype)")
    k = torch.cat([state.features, k], dim=2)
    c = torch.cat([state.log_scale, c], dim=2)
    v = torch.cat([state.value, call.value.to(q.dtype)], dim=2)
    out = dense(q, k, c, v, log_bias(p.rpe, total, q.dtype, call.device), causal=True)
    return AttentionOutput(out.to(call.dtype)), KeyCache(k, c, v, total)


KERNEL_RPE = register(
    Method(
        name="kernel_rpe",
        family="linear",
        exact=False,
        summary=(
            "Kernelised attention with a relative position bias: phi(q_i).phi(k_j) exp(b_{i-j}) weights (FAVOR+ "
            "random features by default), normalised; the bias makes the weights a Toeplitz matrix, so numerator "
            "and denominator are FFT convolutions, O(N log N F Dv) non-causal and O(N log^2 N F Dv) causal; "
            "decoding keeps every key's features."
        ),
        paper=Paper(
            "Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding (Luo et al., 2021)",
            "https://arxiv.org/abs/2106.12566",
        ),
        capabilities=Capabilities(
            causal=True, noncausal=True, cross=True, gqa=True, kv_mask=True, decode=True, state=False
        ),
        params=KernelRPEParams,
        reference=reference,
        backends=(
            Backend(
                "fft",
                fft_runner,
                description="Toeplitz products by real FFTs: O(N log N F Dv) non-causal, O(N log^2 N F Dv) causal",
            ),
        ),
        test_params=(
            {},
            {"feature_map": "elu", "block_size": 16},
            {"feature_map": "relu", "block_size": 4},
            {"num_features": 16, "seed": 3, "block_size": 8},
        ),
        decoder=Decoder(_init_state, _step),
        check=check,
        sample_params=sample_params,
        notes=(
            "Decoding caches every key's features and value (the bias does not factor into a fixed-size state), "
            "so its state grows with the length; there is no return_state."
        ),
    )
)

__all__ = ["KERNEL_RPE", "KernelRPEParams", "KeyCache", "check_rpe", "dense", "features", "log_bias"]
