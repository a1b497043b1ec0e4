"""Chunked linear attention: one core for feature maps, decays, gates and the delta rule.

Every linear and gated-recurrent method is a parameterisation of one recurrence over a state
``S`` of shape ``[Dk, Dv]`` per (batch, key/value head):

* **decay** ``g_t = log(alpha_t) <= 0``: none, constant per head, data-dependent scalar
  (``[B, H, N, 1]``) or data-dependent diagonal (``[B, H, N, Dk]``, one decay per state row);
* **update rule**: additive ``S_t = alpha_t S_{t-1} + k_t v_t^T`` or the delta rule
  ``S_t = alpha_t S_{t-1} + beta_t k_t (v_t - alpha_t S_{t-1}^T k_t)^T``;
* **read-out** ``o_t = S_t^T q_t`` (causal: the state after token ``t``, its own key included;
  non-causal: the state after every token); with ``normalize`` the output is divided by
  ``q_t . z_t`` where ``z`` is the same recurrence run on a value of ones (a zero denominator
  gives a zero row).

Three forms compute it and agree in float64 to rounding (outputs, final states, gradients):

* ``recurrent``: token by token, the obviously-correct definition and the decode step;
* ``chunk``: chunkwise-parallel for training and prefill, any ``N`` and chunk size. Within a
  chunk the decays are a chunk-local cumulative sum ``G`` of the log decays, and every decay
  factor is ``exp`` of a difference ``G_i - G_j`` with ``j <= i`` masked to ``-inf`` before the
  exponent, so no exponent is ever positive. Diagonal gates halve the chunk recursively: a pair
  whose key lies in the first half of a block and whose query in the second factors through the
  last position of the first half (two non-positive exponents, one matmul per level). The delta rule uses the
  WY/UT form: a unit lower-triangular solve per chunk turns the rank-1 updates into matmuls;
* ``parallel``: quadratic, the weight matrix materialised; for checking.

States and accumulators are float32, or float64 for float64 inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linear_state import LinearState, compute_dtype

FORMS = ("recurrent", "chunk", "parallel")
RULES = ("add", "delta")


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    log_decay: Tensor | None = None,
    beta: Tensor | None = None,
    rule: str = "add",
    normalize: bool = False,
    initial_state: LinearState | None = None,
    form: str = "chunk",
    chunk_size: int = 64,
) -> tuple[Tensor, LinearState]:
    """Run the recurrence in one of its three forms.

    Args:
        q: query features ``[B, Hq, N, Dk]`` (feature map and scale applied).
        k: key features ``[B, H, N, Dk]``; ``Hq % H == 0`` (query heads of a group read one state).
        v: values ``[B, H, N, Dv]``.
        causal: read the state after each token (True) or after all tokens (False; only the
            additive rule without decay).
        log_decay: ``log(alpha) <= 0`` of shape ``[B, H, N, 1]`` (scalar) or ``[B, H, N, Dk]``
            (diagonal); constant decays are passed expanded. ``None``: no decay.
        beta: delta-rule write strengths ``[B, H, N]``; ``None`` means 1.
        rule: ``"add"`` or ``"delta"``.
        normalize: divide by ``q . z`` (additive rule only).
        initial_state: the state before token 0 (default zeros).
        form: ``"recurrent"``, ``"chunk"`` or ``"parallel"``.
        chunk_size: tokens per chunk of the chunk form.

    Returns:
        ``out [B, Hq, N, Dv]`` in the compute dtype (float32, or float64) and the final state.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "delta" and normalize:
        raise ValueError("normalize: the delta rule has no normaliser")
    if not causal and (rule != "add" or log_decay is not None):
        raise ValueError("is_causal=False needs the additive rule without decay")
    if rule == "delta" and log_decay is not None and log_decay.shape[-1] != 1:
        raise ValueError("log_decay: the delta rule takes a scalar decay per token, not a diagonal one")
    B, Hq, N, Dk = q.shape
    H, Dv = k.shape[1], v.shape[-1]
    slab = _slab_heads(q, H)
    if form == "chunk" and causal and slab < H:
        return _by_head_slabs(q, k, v, slab, log_decay, beta, rule, normalize, initial_state, chunk_size)
    ct = compute_dtype(q.dtype)
    q5 = q.to(ct).reshape(B, H, Hq // H, N, Dk)
    k, v = k.to(ct), v.to(ct)
    g = None if log_decay is None else log_decay.to(ct)
    b = None if beta is None else beta.to(ct)
    length = 0 if initial_state is None else initial_state.length
    if initial_state is None:
        s0 = torch.zeros(B, H, Dk, Dv, dtype=ct, device=q.device)
        z0 = torch.zeros(B, H, Dk, dtype=ct, device=q.device) if normalize else None
    else:
        s0, z0 = initial_state.state, initial_state.normalizer
    if causal and form == "chunk" and normalize and g is None:  # the common case: no ones column
        out, s, den, z = _chunk_plain_normalized(q5, k, v, s0, z0, chunk_size)
        return (out * _inverse(den)[..., None]).reshape(B, Hq, N, Dv), LinearState(s, z, length + N)
    if normalize:  # the normaliser is the same recurrence on a value column of ones
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        s0 = torch.cat([s0, z0[..., None]], dim=-1)
    if not causal:
        s = s0 + k.mT @ v
        out = q5 @ s.unsqueeze(2)
    elif form == "recurrent":
        out, s = _recurrent(q5, k, v, g, b, s0, rule)
    elif form == "parallel":
        out, s = _parallel(q5, k, v, g, b, s0, rule)
    else:
        out, s = _chunked(q5, k, v, g, b, s0, rule, chunk_size)
    out = out.reshape(B, Hq, N, v.shape[-1])
    if normalize:
        out = out[..., :Dv] * _inverse(out[..., Dv:])
        return out, LinearState(s[..., :Dv], s[..., Dv], length + N)
    return out, LinearState(s, None, length + N)


SLAB_BYTES = 8 * 2**20  # per-slab size of a [B, heads, N, D] intermediate of the chunk form


def _slab_heads(q: Tensor, kv_heads: int) -> int:
    """Key/value heads per slab so that a query-sized intermediate stays under ``SLAB_BYTES``:
    larger allocations are fresh pages from the OS every call (measured: 2x slower per element)."""
    per_head = q.shape[0] * (q.shape[1] // kv_heads) * q.shape[2] * q.shape[3] * 4
    return max(1, min(kv_heads, SLAB_BYTES // max(per_head, 1)))


def _by_head_slabs(q, k, v, slab, log_decay, beta, rule, normalize, initial_state, chunk_size):
    """The chunk form run on groups of ``slab`` key/value heads (heads are independent)."""
    H, groups = k.shape[1], q.shape[1] // k.shape[1]
    outs, states, norms = [], [], []
    for h in range(0, H, slab):
        part = slice(h, h + slab)
        state = None
        if initial_state is not None:
            z = None if initial_state.normalizer is None else initial_state.normalizer[:, part]
            state = LinearState(initial_state.state[:, part], z, initial_state.length)
        out, final = linear_attention(
            q[:, h * groups : (h + slab) * groups],
            k[:, part],
            v[:, part],
            log_decay=None if log_decay is None else log_decay[:, part],
            beta=None if beta is None else beta[:, part],
            rule=rule,
            normalize=normalize,
            initial_state=state,
            chunk_size=chunk_size,
        )
        outs.append(out)
        states.append(final.state)
        norms.append(final.normalizer)
    length = final.length
    normalizer = None if norms[0] is None else torch.cat(norms, dim=1)
    return torch.cat(outs, dim=1), LinearState(torch.cat(states, dim=1), normalizer, length)


def _inverse(den: Tensor) -> Tensor:
    """``1 / den``, and 0 where ``den`` is 0 or subnormal (a row that sees nothing is 0, not NaN or Inf)."""
    zero = den.abs() < torch.finfo(den.dtype).tiny
    return torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, den))


def _read(scores: Tensor, values: Tensor, q: Tensor, before: Tensor) -> Tensor:
    """``scores @ values + q @ before`` (intra plus inter chunk), fused into one batched GEMM
    accumulation where the group dim is 1."""
    intra = scores @ values.unsqueeze(2)
    if q.shape[2] != 1:
        return intra + q @ before.unsqueeze(2)
    shape = intra.shape
    flat = lambda t: t.reshape(-1, t.shape[-2], t.shape[-1])  # noqa: E731
    return torch.baddbmm(flat(intra), flat(q), flat(before)).reshape(shape)


def _exp(like: Tensor, x: Tensor) -> Tensor:
    """``exp(x)`` in ``like``'s dtype. Cumulative log decays are float64 (a float32 cumulative sum
    of strong decays loses the small differences that matter), their differences are rounded to
    the compute dtype only then."""
    return torch.exp(x.to(like.dtype))


def _decay_matrix(G, strict: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """``exp(G_i - G_j)`` for ``j <= i`` (``j < i`` if ``strict``), else 0: ``[..., N, N]`` from
    ``G [..., N]`` (or a pair of broadcastable row and column terms); the upper triangle is
    masked before the exponent."""
    diff = G[0] - G[1] if isinstance(G, tuple) else G[..., :, None] - G[..., None, :]
    n = diff.shape[-1]
    upper = torch.ones(n, n, dtype=torch.bool, device=diff.device).triu(0 if strict else 1)
    diff = diff.masked_fill(upper, float("-inf"))
    return torch.exp(diff if dtype is None else diff.to(dtype))


def _recurrent(q5, k, v, g, beta, s0, rule):
    s, outs = s0, []
    for t in range(k.shape[2]):
        if g is not None:
            s = s * torch.exp(g[:, :, t])[..., None]
        kt = k[:, :, t]
        u = v[:, :, t]
        if rule == "delta":
            u = u - (kt[..., None] * s).sum(-2)
            u = u if beta is None else beta[:, :, t, None] * u
        s = s + kt[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhgd,bhde->bhge", q5[:, :, :, t], s))
    return torch.stack(outs, dim=3), s


def _parallel(q5, k, v, g, beta, s0, rule):
    """The quadratic form with the weight matrix materialised (whole sequence as one block)."""
    n = k.shape[2]
    G = torch.zeros((*k.shape[:3], 1), dtype=torch.float64, device=k.device)
    G = G if g is None else g.to(torch.float64).cumsum(dim=2)  # float64: see _exp
    if G.shape[-1] == 1:
        D = _decay_matrix(G[..., 0], dtype=k.dtype)  # [B, H, N, N]
        weights = (q5 @ k.unsqueeze(2).mT) * D.unsqueeze(2)
    else:  # diagonal: sum the per-dimension decayed products one dimension at a time (N x N memory)
        weights = 0
        for d in range(k.shape[-1]):
            D = _decay_matrix(G[..., d], dtype=k.dtype)
            weights = weights + q5[..., d, None] * k[:, :, None, None, :, d] * D.unsqueeze(2)
    q_decayed = q5 * _exp(k, G).unsqueeze(2)
    if rule == "add":
        out = weights @ v.unsqueeze(2) + q_decayed @ s0.unsqueeze(2)
        s_end = _exp(k, G[:, :, -1, :, None]) * s0 + (k * _exp(k, G[:, :, -1:] - G)).mT @ v
        return out, s_end
    # Delta rule, WY form over the whole sequence: (I + strict_tril(beta_i k_i.k_j D_ij)) U = beta (V - e^G K S0)
    b = torch.ones(k.shape[:3], dtype=k.dtype, device=k.device) if beta is None else beta
    A = torch.eye(n, dtype=k.dtype, device=k.device) + b[..., None] * (k @ k.mT) * _decay_matrix(
        G[..., 0], strict=True, dtype=k.dtype
    )
    rhs = b[..., None] * (v - _exp(k, G) * (k @ s0))
    u = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    out = weights @ u.unsqueeze(2) + q_decayed @ s0.unsqueeze(2)
    s_end = _exp(k, G[:, :, -1, :, None]) * s0 + (k * _exp(k, G[:, :, -1:] - G)).mT @ u
    return out, s_end


def _pad(x: Tensor | None, n_pad: int, dim: int = 2) -> Tensor | None:
    if x is None or n_pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n_pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _chunked(q5, k, v, g, beta, s0, rule, chunk_size):
    B, H, Gq, N, Dk = q5.shape
    C = max(1, min(chunk_size, N))
    if g is not None and g.shape[-1] > 1:
        C = 1 << (C - 1).bit_length()  # diagonal gates: a power of two (halving, see _diagonal_intra)
    n_pad = -N % C
    # padding: zero queries/keys/values, no decay (log 1 = 0), no delta write (beta 0)
    q5, k, v, g = _pad(q5, n_pad, 3), _pad(k, n_pad), _pad(v, n_pad), _pad(g, n_pad)
    if rule == "delta":
        beta = torch.ones(B, H, N, dtype=k.dtype, device=k.device) if beta is None else beta
        beta = _pad(beta, n_pad)
    nc = (N + n_pad) // C
    qc = q5.reshape(B, H, Gq, nc, C, Dk)
    kc = k.reshape(B, H, nc, C, Dk)
    vc = v.reshape(B, H, nc, C, v.shape[-1])
    # chunk-local inclusive cumulative log decays, in float64 (see _exp)
    G = None if g is None else g.reshape(B, H, nc, C, g.shape[-1]).to(torch.float64).cumsum(dim=3)
    if rule == "delta":
        out, s = _chunk_delta(qc, kc, vc, G, beta.reshape(B, H, nc, C), s0)
    elif G is None:
        out, s = _chunk_add_plain(qc, kc, vc, s0)[:2]
    elif G.shape[-1] == 1:
        out, s = _chunk_add_scalar(qc, kc, vc, G[..., 0], s0)
    else:
        out, s = _chunk_add_diagonal(qc, kc, vc, G, s0)
    return out.reshape(B, H, Gq, nc * C, -1)[:, :, :, :N], s


def _chunk_plain_normalized(q5, k, v, s0, z0, chunk_size):
    B, H, Gq, N, Dk = q5.shape
    C = max(1, min(chunk_size, N))
    n_pad = -N % C
    q5, k, v = _pad(q5, n_pad, 3), _pad(k, n_pad), _pad(v, n_pad)
    nc = (N + n_pad) // C
    qc, kc, vc = q5.reshape(B, H, Gq, nc, C, Dk), k.reshape(B, H, nc, C, Dk), v.reshape(B, H, nc, C, v.shape[-1])
    out, s, den, z = _chunk_add_plain(qc, kc, vc, s0, z0)
    out = out.reshape(B, H, Gq, nc * C, -1)[:, :, :, :N]
    return out, s, den.reshape(B, H, Gq, nc * C)[:, :, :, :N], z


def _chunk_add_plain(qc, kc, vc, s0, z0=None):
    """No decay. With ``z0`` (normalising) also returns the denominators ``[B, H, G, nc, C]``."""
    C = kc.shape[-2]
    scores = qc @ kc.unsqueeze(2).mT  # [B, H, G, nc, C, C]
    scores.masked_fill_(torch.ones(C, C, dtype=torch.bool, device=kc.device).triu(1), 0.0)
    writes = kc.mT @ vc  # [B, H, nc, Dk, Dv]
    before, s = _prefix_states(s0, writes)
    out = _read(scores, vc, qc, before)
    if z0 is None:
        return out, s, None, None
    z_before, z = _prefix_states(z0[..., None], kc.sum(-2)[..., None])
    den = scores.sum(-1) + (qc @ z_before.unsqueeze(2))[..., 0]
    return out, s, den, z[..., 0]


PREFIX_BLOCK = 64  # chunks per matmul of the state prefix


def _prefix_states(s0, writes, chunk_log_decay=None):
    """States before each chunk, ``S_c = a_c S_{c-1} + writes_c``, and the final state.

    ``writes [B, H, nc, Dk, Dv]``; ``chunk_log_decay`` ``[B, H, nc, 1 or Dk]`` (the log decay
    over each whole chunk) or ``None``. Within blocks of ``PREFIX_BLOCK`` chunks the prefix is
    one matmul with the (log-space, masked before the exponent) decay matrix; a short loop
    carries the state between blocks. A token-level ``cumsum`` or a loop over every chunk is
    several times slower on CPU.
    """
    B, H, nc, Dk, Dv = writes.shape
    carry, befores = s0, []
    for start in range(0, nc, PREFIX_BLOCK):
        w = writes[:, :, start : start + PREFIX_BLOCK]
        t = w.shape[2]
        if chunk_log_decay is None:
            L = torch.ones(t, t, dtype=w.dtype, device=w.device).tril(-1)
            before = (L @ w.reshape(B, H, t, Dk * Dv)).reshape(B, H, t, Dk, Dv) + carry.unsqueeze(2)
            carry = carry + w.sum(dim=2)
        else:
            lg = chunk_log_decay[:, :, start : start + PREFIX_BLOCK]  # [B, H, t, Dg]
            inclusive = lg.cumsum(dim=2)
            exclusive = inclusive - lg
            # L_ij = exp(exclusive_i - inclusive_j) for j < i: decay from the end of chunk j to the start of i
            L = _decay_matrix((exclusive.mT[..., :, None], inclusive.mT[..., None, :]), True, writes.dtype)
            if lg.shape[-1] == 1:
                before = (L[:, :, 0] @ w.reshape(B, H, t, Dk * Dv)).reshape(B, H, t, Dk, Dv)
            else:  # one decay matrix per state row
                before = (L @ w.permute(0, 1, 3, 2, 4)).permute(0, 1, 3, 2, 4)
            before = before + _exp(writes, exclusive)[..., None] * carry.unsqueeze(2)
            last = inclusive[:, :, -1:]
            carry = _exp(writes, last[:, :, 0])[..., None] * carry + (
                _exp(writes, last - inclusive)[..., None] * w
            ).sum(2)
        befores.append(before)
    return (befores[0] if len(befores) == 1 else torch.cat(befores, dim=2)), carry


def _chunk_add_scalar(qc, kc, vc, G, s0):
    D = _decay_matrix(G, dtype=kc.dtype)  # [B, H, nc, C, C]
    scores = (qc @ kc.unsqueeze(2).mT) * D.unsqueeze(2)
    last = G[..., -1:]  # [B, H, nc, 1]
    writes = (kc * _exp(kc, last - G)[..., None]).mT @ vc
    before, s = _prefix_states(s0, writes, last)
    out = scores @ vc.unsqueeze(2) + (qc * _exp(kc, G)[:, :, None, ..., None]) @ before.unsqueeze(2)
    return out, s


def _chunk_add_diagonal(qc, kc, vc, G, s0):
    _B, _H, _Gq, _nc, _C, _Dk = qc.shape
    last = G[:, :, :, -1:]  # [B, H, nc, 1, Dk]
    writes = (kc * _exp(kc, last - G)).mT @ vc
    before, s = _prefix_states(s0, writes, last[:, :, :, 0])
    out = (qc * _exp(kc, G).unsqueeze(2)) @ before.unsqueeze(2)
    out = out + _diagonal_intra(qc, kc, G) @ vc.unsqueeze(2)
    return out, s


def _diagonal_intra(qc, kc, G):
    """Intra-chunk weights ``A_ij = sum_d q_id k_jd exp(G_id - G_jd)`` (``j <= i``) with no
    positive exponent: ``[B, H, Gq, nc, C, C]``.

    Halving: every pair ``j < i`` lies in exactly one block (of size ``b = C, C/2, ..., 2``) that
    has ``j`` in its first half and ``i`` in its second; through ``r``, the last position of the
    first half, ``exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j)``, both exponents ``<= 0``, so the
    pairs of a level are one batched matmul. The diagonal is ``q_i . k_i``. ``C`` is a power of two.
    """
    B, H, Gq, nc, C, Dk = qc.shape
    weights = torch.diag_embed((qc * kc.unsqueeze(2)).sum(-1))  # i == j
    b = C
    while b >= 2:
        m, h = C // b, b // 2
        Gb = G.reshape(B, H, nc, m, b, Dk)
        ref = Gb[..., h - 1 : h, :]  # [B, H, nc, m, 1, Dk]
        q2 = qc.reshape(B, H, Gq, nc, m, b, Dk)[..., h:, :] * _exp(qc, Gb[..., h:, :] - ref).unsqueeze(2)
        k1 = kc.reshape(B, H, nc, m, b, Dk)[..., :h, :] * _exp(qc, ref - Gb[..., :h, :])
        block = q2 @ k1.unsqueeze(2).mT  # [B, H, Gq, nc, m, h, h]: rows i in the second half, keys j in the first
        # the m diagonal [b, b] blocks of the [C, C] weights, as a view [.., b, b, m]; write their lower-left quarter
        diagonal = weights.view(B, H, Gq, nc, m, b, m, b).diagonal(dim1=4, dim2=6)
        diagonal[..., h:, :h, :] = block.movedim(4, -1)
        b = h
    return weights


def _chunk_delta(qc, kc, vc, G, beta, s0):
    """Delta rule per chunk in WY form: ``U = A^-1 beta V - A^-1 beta e^G K S`` where
    ``A = I + strict_tril(beta_i (k_i . k_j) e^(G_i - G_j))``; the state passes between chunks."""
    B, H, nc, C, _Dk = kc.shape
    G = torch.zeros(B, H, nc, C, dtype=kc.dtype, device=kc.device) if G is None else G[..., 0]
    eye = torch.eye(C, dtype=kc.dtype, device=kc.device)
    A = eye + beta[..., None] * (kc @ kc.mT) * _decay_matrix(G, strict=True, dtype=kc.dtype)
    rhs = torch.cat([beta[..., None] * vc, beta[..., None] * _exp(kc, G)[..., None] * kc], dim=-1)
    solved = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    u0, w = solved[..., : vc.shape[-1]], solved[..., vc.shape[-1] :]
    last = G[..., -1:]
    k_write = kc * _exp(kc, last - G)[..., None]
    s, befores, us = s0, [], []
    for c in range(nc):
        befores.append(s)
        u = u0[:, :, c] - w[:, :, c] @ s
        us.append(u)
        s = _exp(kc, last[:, :, c])[..., None] * s + k_write[:, :, c].mT @ u
    before, u = torch.stack(befores, dim=2), torch.stack(us, dim=2)
    scores = (qc @ kc.unsqueeze(2).mT) * _decay_matrix(G, dtype=kc.dtype).unsqueeze(2)
    out = scores @ u.unsqueeze(2) + (qc * _exp(kc, G)[:, :, None, ..., None]) @ before.unsqueeze(2)
    return out, s
