"""``performer``: FAVOR+ positive orthogonal random features (Choromanski et al., 2021, "Rethinking
Attention with Performers").

The softmax kernel ``exp(scale q.k)`` is estimated by ``phi(q') . phi(k')`` with ``q' = q *
sign(scale) |scale|^0.5`` and ``k' = k |scale|^0.5`` (so ``q'.k' = scale q.k``) and the positive
random features ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)``; ``W [m, D]`` holds ``m = num_features``
rows drawn as in the paper: orthogonal blocks of ``D`` rows (QR of Gaussian ``D x D`` matrices, the
column signs fixed by ``R`` so each block is Haar-distributed), each row rescaled to the norm of an
independent Gaussian vector (chi-distributed with ``D`` degrees of freedom). The projection is drawn
from ``torch.Generator().manual_seed(seed)`` in float64 on the CPU, shared by all heads and cached
per (num_features, D, seed, dtype, device); ``projection`` passes an explicit ``[m, D]`` matrix
instead (it overrides ``num_features`` and ``seed``). Redrawing features (as the paper does during
training) is the caller's business: pass a new ``seed`` or ``projection``.

With ``normalize=True`` (the paper's attention): ``o_i = sum_j phi(q_i).phi(k_j) v_j / sum_j
phi(q_i).phi(k_j)`` over the visible keys (``j <= i`` causal, bottom-right aligned; all non-causal);
a zero denominator gives a zero row. With ``normalize=False`` the denominator is dropped: ``o_i``
estimates ``sum_j exp(scale q_i.k_j) v_j``.

Stabilisation (exact: every factor it introduces cancels). A key's features are divided by
``exp(m_j)``, ``m_j`` the running maximum of the log-features over the real keys ``<= j`` (and those
of the initial state): the state is then kept scaled by ``exp(-m_t)``, a per-token log decay
``m_{t-1} - m_t <= 0`` of the shared recurrence rescales it when the maximum grows, and the factor
cancels in the normalised output. A query's features are divided by ``exp(s_i)``, a row factor
(cancelled by the normalisation) chosen from the keys it sees: ``s_i = max(max_f(a_if + log z_if),
max_f a_if - 40)`` with ``a_i`` its log-features and ``z_i`` the (scaled) key-feature sums of its
visible keys (a log-cumsum-exp, so causal rows only look back), which makes the row's largest
term of the denominator 1 and caps every query feature at ``e^40``. Nothing depends on later keys
(no leak; performer-pytorch's sequence-wide key maximum leaks the future in causal mode), no
feature overflows whatever the magnitudes (keys or queries 100 times their usual size are fine),
and typical denominators stay far from underflow in float32 even at D = 128 (a data-independent key
shift ``max_i |w_i|^2 / 2`` leaves typical products near 1e-42 there). Limit: when queries and keys
are both huge (scores ``scale q.k`` spread over more than about +-100, where the estimator's
variance is astronomical anyway) a row's terms can span more than float32's range and its
denominator can underflow; float64 inputs reach much further. Non-causal calls use the maximum and
sums over all real keys. The state (``return_state``, decoding) is a :class:`PerformerState`: the
shared :class:`~attnzoo.kernels.linear_state.LinearState` plus the log scale ``m``. ``normalize=False``
uses the unshifted features (the un-normalised sum has the magnitude of ``exp(scale q.k)`` anyway).
Features are computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..inputs import AttentionCall
from ..kernels.linear_state import LinearState, check_state, compute_dtype, empty_state
from ..params import param
from ..registry import AttentionOutput, Backend, Capabilities, Decoder, Method, Paper, register
from . import _recurrent as rec


@dataclass(frozen=True)
class PerformerState(LinearState):
    """A :class:`~attnzoo.kernels.linear_state.LinearState` whose state and normaliser are scaled by
    ``exp(-log_scale)``: ``log_scale [B, Hkv]`` is the running maximum of the key log-features
    (``-inf`` before the first real key); ``None`` with ``normalize=False`` (unscaled)."""

    log_scale: Tensor | None = None

    def size_bytes(self) -> int:
        extra = 0 if self.log_scale is None else self.log_scale.numel() * self.log_scale.element_size()
        return super().size_bytes() + extra

    def detach(self) -> PerformerState:
        return replace(super().detach(), log_scale=None if self.log_scale is None else self.log_scale.detach())


@dataclass(frozen=True)
class PerformerParams(rec.RecurrentParams):
    num_features: int = param(256, "m: random features per head (ignored when projection is given)")
    seed: int = param(0, "seed of the orthogonal random projection (redraw = pass a new seed)")
    projection: Tensor | None = param(  # noqa: RUF009
        None, "explicit projection W [m, D] (overrides num_features and seed)"
    )
    normalize: bool = param(True, "divide by phi(q) . sum phi(k) (softmax attention); False: un-normalised sum")
    initial_state: PerformerState | None = param(  # noqa: RUF009
        None, "the state before the first token (a PerformerState from return_state=True)"
    )

    def validate(self) -> None:
        super().validate()
        if self.num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {self.num_features}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


# -- the projection and the features ------------------------------------------------------------


def orthogonal_projection(
    num_features: int,
    dim: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """FAVOR+'s ``[num_features, dim]`` projection: stacked orthogonal blocks of ``dim`` rows (the
    last one truncated), each row rescaled to the norm of a fresh Gaussian vector. Drawn in
    float64 from ``generator`` (a CPU generator), then cast."""
    blocks = []
    for _ in range(-(-num_features // dim)):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
        blocks.append((q * signs).T)  # rows orthonormal; the sign fix makes the block Haar-distributed
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (rows * norms[:, None]).to(dtype=dtype, device=device)


_PROJECTIONS: dict[tuple[int, int, int, torch.dtype, str], Tensor] = {}


def cached_projection(num_features: int, dim: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`orthogonal_projection` from ``torch.Generator().manual_seed(seed)``, cached."""
    key = (num_features, dim, seed, dtype, str(device))
    if key not in _PROJECTIONS:
        gen = torch.Generator().manual_seed(seed)
        _PROJECTIONS[key] = orthogonal_projection(num_features, dim, gen, dtype, device)
    return _PROJECTIONS[key]


def projection_for(num_features: int, seed: int, projection: Tensor | None, call: AttentionCall) -> Tensor:
    """The projection a call uses, in its compute dtype (float32, or float64 for float64 inputs)."""
    ct = compute_dtype(call.dtype)
    if projection is not None:
        return projection.to(ct)
    return cached_projection(num_features, call.head_dim, seed, ct, call.device)


def check_projection(projection: Tensor | None, call: AttentionCall) -> None:
    """An explicit projection is a finite floating ``[m, D]`` tensor on the call's device."""
    if projection is None:
        return
    if projection.dim() != 2 or projection.shape[1] != call.head_dim or projection.shape[0] < 1:
        raise ValueError(f"projection must have shape [m, D] with D = {call.head_dim}, got {list(projection.shape)}")
    if not projection.is_floating_point() or projection.device != call.device:
        raise ValueError(
            f"projection must be a floating tensor on {call.device}, got {projection.dtype} on {projection.device}"
        )
    if not bool(torch.isfinite(projection).all()):
        raise ValueError("projection must be finite")


def scaled_inputs(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """``(q', k')`` with ``q'.k' = scale q.k`` (any sign of scale), in the compute dtype."""
    ct = compute_dtype(call.dtype)
    root = math.sqrt(abs(call.scale))
    return call.query.to(ct) * math.copysign(root, call.scale), call.key.to(ct) * root


def performer_log_features(x: Tensor, projection: Tensor) -> Tensor:
    """``log phi(x) = W x - |x|^2 / 2 - log(m) / 2``: ``[..., D] -> [..., m]`` (``x`` already scaled)."""
    m = projection.shape[0]
    return x @ projection.mT - x.square().sum(-1, keepdim=True) / 2 - math.log(m) / 2


def performer_features(x: Tensor, projection: Tensor, is_query: bool) -> tuple[Tensor, Tensor | None]:
    """FAVOR+ positive features of ``x`` (already scaled), stabilised by each token's own maximum.

    Returns ``(features, log_scale)`` with ``phi(x) = features * exp(log_scale)``. Queries: the
    row maximum is dropped (``log_scale`` is ``None``): it cancels in normalised attention (the
    methods use :func:`query_features`, which also keeps the denominators representable). Keys:
    ``log_scale [...]`` is each key's maximum log-feature (detached: the output does not depend on
    it); the caller must fold it back in with a factor no key after it can change (a running
    maximum, never a sequence-wide one in causal mode).
    """
    logs = performer_log_features(x, projection)
    top = logs.detach().amax(dim=-1)
    features = torch.exp(logs - top[..., None])
    return (features, None) if is_query else (features, top)


QUERY_CAP = 40.0  # query features stay <= e^40: sums over 1e6 keys of values 1e3 fit in float32


def key_log_mass(logs: Tensor, causal: bool, q_len: int, prior: Tensor | None = None) -> Tensor:
    """``log sum_j exp(logs_j)`` over each query row's visible keys, per feature: ``logs [B, H, Nk,
    F]`` (``-inf`` for padding), ``prior [B, H, F]`` (keys before the call) -> ``[B, H, Nq, F]``
    (causal, bottom-right aligned; rows before the first key ``-inf``) or ``[B, H, 1, F]``."""
    if not causal:
        mass = torch.logsumexp(logs, dim=2, keepdim=True)
        return mass if prior is None else torch.logaddexp(mass, prior[:, :, None])
    mass = torch.logcumsumexp(logs, dim=2)
    if prior is not None:
        mass = torch.logaddexp(mass, prior[:, :, None])
    position = torch.arange(q_len, device=logs.device) + logs.shape[2] - q_len
    return mass[:, :, position.clamp(0, logs.shape[2] - 1)].masked_fill((position < 0)[:, None], -math.inf)


def last_visible(kv_len: int, q_len: int, device: torch.device) -> Tensor:
    """The last key index each causal query row sees (bottom-right), clamped into ``[0, Nk)``."""
    return (torch.arange(q_len, device=device) + kv_len - q_len).clamp(0, kv_len - 1)


def query_features(logs: Tensor, log_mass: Tensor, cap: float = QUERY_CAP) -> Tensor:
    """``exp(logs_i - s_i)`` with the row factor ``s_i = max(max_f(logs_if + log_mass_if), max_f
    logs_if - cap)``: the row's largest term of the denominator is 1 and no feature exceeds
    ``e^cap``. ``logs [B, Hq, Nq, F]``, ``log_mass [B, Hkv, Nq or 1, F]`` (the visible keys' feature
    sums in the scale the keys are passed in)."""
    B, Hq, Nq, F = logs.shape
    a = logs.detach()
    best = (a.view(B, log_mass.shape[1], -1, Nq, F) + log_mass[:, :, None]).amax(dim=-1).reshape(B, Hq, Nq)
    shift = torch.maximum(best, a.amax(dim=-1) - cap)
    return torch.exp(logs - shift[..., None])


# -- the recurrence -----------------------------------------------------------------------------


def _key_reference(top: Tensor, offset: Tensor, causal: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """Key log scales ``top [B, H, N]`` (``-inf`` for padding) and the state's ``offset [B, H]``
    to ``(reference [B, H, N] or [B, H, 1], log decay [B, H, N, 1] or None, final offset)``:
    causal, the running maximum; non-causal, the maximum over everything. Where no real key has
    been seen the reference is taken from the first real key (those rows read a zero state)."""
    if not causal:
        total = torch.maximum(offset, top.amax(dim=-1))
        return torch.where(torch.isfinite(total), total, 0.0)[..., None], None, total
    running = torch.cat([offset[..., None], top], dim=-1).cummax(dim=-1).values  # [B, H, N + 1]
    finite = torch.isfinite(running)
    first = torch.where(finite, running, math.inf).amin(dim=-1, keepdim=True)
    filled = torch.where(finite, running, torch.where(torch.isfinite(first), first, 0.0))
    return filled[..., 1:], (filled[..., :-1] - filled[..., 1:])[..., None], running[..., -1]


def _run(call: AttentionCall, p: PerformerParams, form: str, state: PerformerState | None):
    """``(out, final PerformerState)``: the features, the key reference, then the shared recurrence."""
    ct = compute_dtype(call.dtype)
    W = projection_for(p.num_features, p.seed, p.projection, call)
    qs, ks = scaled_inputs(call)
    start = 0 if state is None else state.length
    if not p.normalize:
        q, k = torch.exp(performer_log_features(qs, W)), torch.exp(performer_log_features(ks, W))
        out, final = rec.run(call, p, rec.Recurrence(q, k), form, state)
        return out, PerformerState(final.state, None, final.length, None)
    logs = performer_log_features(ks, W)
    top = logs.detach().amax(dim=-1)
    if call.kv_mask is not None:
        top = top.masked_fill(~call.kv_mask[:, None, :], -math.inf)
    offset = torch.full(top.shape[:2], -math.inf, dtype=ct, device=call.device)
    if state is not None and state.log_scale is not None:
        offset = state.log_scale
    reference, log_decay, final_offset = _key_reference(top, offset, call.is_causal)
    dead = torch.isinf(top)[..., None]
    k = torch.exp((logs - reference[..., None]).masked_fill(dead, -math.inf))
    prior = None if state is None or start == 0 else torch.log(state.normalizer) + offset[..., None]
    mass = key_log_mass(logs.detach().masked_fill(dead, -math.inf), call.is_causal, call.q_len, prior)
    row_reference = reference[:, :, last_visible(call.kv_len, call.q_len, call.device)] if call.is_causal else reference
    q = query_features(performer_log_features(qs, W), mass - row_reference[..., None])
    if not call.is_causal and state is not None and start > 0:  # rescale the state to the new reference
        factor = torch.exp(offset - reference[..., 0])
        state = replace(
            state, state=state.state * factor[..., None, None], normalizer=state.normalizer * factor[..., None]
        )
    out, final = rec.run(call, p, rec.Recurrence(q, k, log_decay=log_decay, normalize=True), form, state)
    return out, PerformerState(final.state, final.normalizer, final.length, final_offset)


def _runner(form: str):
    def runner(call: AttentionCall, p: PerformerParams) -> AttentionOutput:
        out, state = _run(call, p, form, p.initial_state)
        return AttentionOutput(out, None, state if call.return_state else None)

    runner.__name__ = f"{form}_form"
    return runner


_recurrent_form = _runner("recurrent")


def reference(call: AttentionCall, p: PerformerParams) -> AttentionOutput:
    """The features, then the shared recurrence token by token (the recurrent form)."""
    return _recurrent_form(call, p)


def _feature_dim(head_dim: int, p: PerformerParams) -> int:
    return p.num_features if p.projection is None else p.projection.shape[0]


def _init_state(batch, kv_heads, head_dim, value_dim, dtype, device, p: PerformerParams) -> PerformerState:
    base = empty_state(batch, kv_heads, _feature_dim(head_dim, p), value_dim, p.normalize, dtype, device)
    offset = torch.full((batch, kv_heads), -math.inf, dtype=base.state.dtype, device=device) if p.normalize else None
    return PerformerState(base.state, base.normalizer, 0, offset)


def _step(call: AttentionCall, state: PerformerState, p: PerformerParams):
    out, new = _run(call, p, "chunk", state)
    return AttentionOutput(out), new


def check(call: AttentionCall, p: PerformerParams) -> None:
    """The projection, then the initial state (shape, dtype, log scale)."""
    check_projection(p.projection, call)
    s = p.initial_state
    if s is None:
        return
    check_state(s, call.batch, call.kv_heads, _feature_dim(call.head_dim, p), call.value_dim, p.normalize, call.dtype)
    if not isinstance(s, PerformerState):
        raise ValueError(f"initial_state must be a PerformerState (from return_state=True), got {type(s).__name__}")
    if p.normalize:
        shape = [call.batch, call.kv_heads]
        ok = s.log_scale is not None and list(s.log_scale.shape) == shape and s.log_scale.dtype == s.state.dtype
        if not ok:
            raise ValueError(f"initial_state.log_scale must be a {s.state.dtype} tensor of shape [B, Hkv] = {shape}")
    elif s.log_scale is not None:
        raise ValueError("initial_state.log_scale must be None with normalize=False (the state is unscaled)")


PERFORMER = register(
    Method(
        name="performer",
        family="linear",
        exact=False,
        summary=(
            "FAVOR+: positive orthogonal random features phi(x) = exp(Wx - |x|^2/2)/sqrt(m) estimate the softmax "
            "kernel, so attention becomes linear attention over m features; causal as a recurrence over an m x Dv "
            "state (chunkwise, O(N C m + N m Dv), O(1) decoding), keys stabilised by a running maximum (no leak, "
            "no overflow)."
        ),
        paper=Paper(
            "Rethinking Attention with Performers (Choromanski et al., 2021)", "https://arxiv.org/abs/2009.14794"
        ),
        capabilities=Capabilities(
            causal=True, noncausal=True, cross=True, gqa=True, kv_mask=True, decode=True, state=True
        ),
        params=PerformerParams,
        reference=reference,
        backends=(
            Backend("chunk", _runner("chunk"), description="chunkwise-parallel: O(N C m + N m Dv)"),
            Backend("parallel", _runner("parallel"), description="quadratic, weights materialised (checking)"),
        ),
        test_params=(
            {},
            {"num_features": 64, "seed": 1, "chunk_size": 16},
            {"num_features": 32, "normalize": False, "chunk_size": 5},
            {"num_features": 20, "seed": 2},
        ),
        decoder=Decoder(_init_state, _step),
        check=check,
        notes=(
            "Approximate: the error against softmax attention falls as num_features grows. The projection is fixed "
            "by seed (or passed explicitly); a training loop that redraws features passes a new seed or projection."
        ),
    )
)

__all__ = [
    "PERFORMER",
    "PerformerParams",
    "PerformerState",
    "cached_projection",
    "key_log_mass",
    "last_visible",
    "orthogonal_projection",
    "performer_features",
    "performer_log_features",
    "query_features",
]
