"""retention, lightning, gla and transnormer: each against a naive float64 token loop written from
its paper's definition, the constant-decay methods against gla, extreme gates across the three
forms, what belongs to the layer, refusals, decoding and continuation, and bf16 training."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.api import prepare
from attnzoo.kernels.linear_state import LinearState
from attnzoo.methods.lightning import lightning_decays, lightning_slopes
from attnzoo.methods.transnormer import DiagState, diag_layout
from attnzoo.testing.helpers import assert_refused, assert_trains

# (Nq, Nk, padded): self, cross with more keys (unaligned offsets), more queries, left/right padding
SETTINGS = [(20, 20, False), (13, 30, False), (30, 13, False), (20, 20, True)]


def inputs(nq, nk, padded, hq=4, hk=2, d=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, nq, d, generator=gen, dtype=dtype)
    k = torch.randn(2, hk, nk, d, generator=gen, dtype=dtype)
    v = torch.randn(2, hk, nk, d, generator=gen, dtype=dtype)
    kv_mask = None
    if padded:  # right padding on batch 0, left padding on batch 1
        pos = torch.arange(nk)
        kv_mask = torch.stack([pos < nk - 6, pos >= 5])
    return q, k, v, kv_mask


PHI = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu, "identity": lambda x: x}


def real(kv_mask, b, j):
    return kv_mask is None or bool(kv_mask[b, j])


# ----------------------------------------------------------------------------- naive definitions
def rows(q, k):
    """Every (batch, query head, its kv head, query, its key position, bottom-right aligned)."""
    B, Hq, Nq, _ = q.shape
    for b, h, i in itertools.product(range(B), range(Hq), range(Nq)):
        yield b, h, h // (Hq // k.shape[1]), i, i + k.shape[2] - Nq


def zeros_like_out(q, v):
    return torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)


def naive_decayed(q, k, v, gammas, scale, kv_mask=None):
    """RetNet / Lightning: o_i = sum_{j <= i} gamma^(i-j) (q_i . k_j) scale v_j."""
    out = zeros_like_out(q, v)
    for b, h, kh, i, pos in rows(q, k):
        for j in range(max(0, pos + 1)):
            if real(kv_mask, b, j):
                out[b, h, i] += gammas[kh] ** (pos - j) * float(q[b, h, i] @ k[b, kh, j]) * scale * v[b, kh, j]
    return out


def naive_gla(q, k, v, gate, scale, kv_mask, normalize, phi):
    """GLA's recurrence: S_t = diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t (scale), read per
    query from the state after its aligned key; with normalize divided by q . z_t."""
    D, states = q.shape[-1], {}
    for b, kh in itertools.product(range(k.shape[0]), range(k.shape[1])):
        S, z = torch.zeros(D, v.shape[-1], dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
        for t in range(k.shape[2]):
            alpha = torch.ones(D, dtype=torch.float64) if gate is None else torch.exp(gate[b, kh, t].double())
            kt = phi(k[b, kh, t]) if real(kv_mask, b, t) else torch.zeros(D, dtype=torch.float64)
            S, z = alpha[:, None] * S + torch.outer(kt, v[b, kh, t]), alpha * z + kt
            states[b, kh, t] = S, z
    out = zeros_like_out(q, v)
    for b, h, kh, i, pos in rows(q, k):
        if pos >= 0:
            (S, z), qi = states[b, kh, pos], phi(q[b, h, i])
            if not normalize:
                out[b, h, i] = (S.T @ qi) * scale
            elif float(qi @ z) != 0:
                out[b, h, i] = (S.T @ qi) / float(qi @ z)
    return out


def row_norm(x, kind, eps):
    if kind == "none":
        return x
    if kind == "layernorm":
        x = x - x.mean()
    return x / math.sqrt(float(x.square().mean()) + eps)


def naive_norm_attention(q, k, v, causal, scale, phi, norm, eps=1e-6, kv_mask=None):
    """NormAttention: Norm(sum_{j visible} (phi(q_i) . phi(k_j)) scale v_j), one row at a time."""
    out = zeros_like_out(q, v)
    for b, h, kh, i, pos in rows(q, k):
        row = torch.zeros(v.shape[-1], dtype=torch.float64)
        for j in range(k.shape[2]):
            if (not causal or j <= pos) and real(kv_mask, b, j):
                row += float(phi(q[b, h, i]) @ phi(k[b, kh, j])) * scale * v[b, kh, j]
        out[b, h, i] = row_norm(row, norm, eps)
    return out


def naive_diag_attention(q, k, v, causal, scale, block, kv_mask=None):
    """DiagAttention: softmax over the keys in the query's block (positions aligned bottom-right)."""
    out = zeros_like_out(q, v)
    for b, h, kh, i, pos in rows(q, k):
        keys = [j for j in range(k.shape[2]) if math.floor(pos / block) == j // block and real(kv_mask, b, j)]
        keys = [j for j in keys if not causal or j <= pos]
        if keys:
            scores = torch.stack([q[b, h, i] @ k[b, kh, j] for j in keys]) * scale
            out[b, h, i] = torch.softmax(scores, 0) @ v[b, kh, keys]
    return out


# ----------------------------------------------------------------------------- retention, lightning
DECAYED = [  # (method, params, kv heads, the decay of each kv head, written from the papers)
    ("retention", {}, 2, [1 - 2**-5, 1 - 2**-6]),  # RetNet: 1 - 2^(-5-h)
    ("retention", {}, 3, [1 - 2**-5, 1 - 2**-6, 1 - 2**-7]),
    ("retention", {"decay": 0.9}, 2, [0.9, 0.9]),
    ("retention", {"decay": (0.5, 0.97)}, 2, [0.5, 0.97]),
    ("lightning", {}, 3, [math.exp(-s) for s in (2**-4, 2**-8, 2**-2)]),  # ALiBi slopes, H not a power of 2
    ("lightning", {}, 4, [math.exp(-(2.0 ** (-2 * (h + 1)))) for h in range(4)]),
    ("lightning", {"decay": (0.8,)}, 2, [0.8, 0.8]),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("method,params,hk,decays", DECAYED, ids=str)
def test_constant_decays_match_naive_loop(setting, method, params, hk, decays):
    q, k, v, kv_mask = inputs(*setting, hq=2 * hk, hk=hk)
    expected = naive_decayed(q, k, v, decays, 8**-0.5, kv_mask)
    for backend in ("chunk", "parallel", "reference"):
        kwargs = {"is_causal": True, "kv_mask": kv_mask, "method": method, "backend": backend, "chunk_size": 6}
        torch.testing.assert_close(attnzoo.attention(q, k, v, **kwargs, **params), expected, rtol=0, atol=1e-12)


def rotate(x, positions):
    """Rotary rotation of consecutive feature pairs by position * theta_d (the layer's xPos/rotary)."""
    d = x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[:, None] * theta[None, :]
    cos, sin = angle.cos().repeat_interleave(2, -1), angle.sin().repeat_interleave(2, -1)
    pairs = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    return x * cos + pairs * sin


def test_retention_leaves_rotation_and_group_norm_to_the_layer():
    q, k, v, _ = inputs(30, 30, False)
    # the layer rotates q and k by absolute positions before the call; decoding continues the positions
    pos = torch.arange(30)
    qr, kr = rotate(q, pos), rotate(k, pos)
    out = attnzoo.attention(qr, kr, v, is_causal=True, method="retention")
    gammas = [1 - 2**-5, 1 - 2**-6]
    torch.testing.assert_close(out, naive_decayed(qr, kr, v, gammas, 8**-0.5), rtol=0, atol=1e-12)
    state = attnzoo.init_state("retention", batch=2, kv_heads=2, head_dim=8, dtype=torch.float64)
    first, state = attnzoo.step(qr[:, :, :17], kr[:, :, :17], v[:, :, :17], state)
    second, state = attnzoo.step(rotate(q[:, :, 17:], pos[17:]), rotate(k[:, :, 17:], pos[17:]), v[:, :, 17:], state)
    torch.testing.assert_close(torch.cat([first, second], 2), out, rtol=0, atol=1e-12)
    # no normalisation inside: linear in the values
    twice = attnzoo.attention(qr, kr, 2 * v, is_causal=True, method="retention")
    torch.testing.assert_close(twice, 2 * out, rtol=0, atol=1e-12)
    # RetNet's reference code rescales rows (normalised decay mask, score normalisation); the layer's
    # group norm (per head over Dv) divides those positive per-row factors out
    i = torch.arange(30)
    diff = (i[:, None] - i[None, :]).double()
    gamma = torch.tensor(gammas, dtype=torch.float64).repeat_interleave(2)[:, None, None]
    mask = torch.where(diff >= 0, gamma ** diff.clamp(min=0), 0.0)
    mask = mask / mask.sum(-1, keepdim=True).sqrt()
    kv = torch.repeat_interleave(kr, 2, dim=1), torch.repeat_interleave(v, 2, dim=1)
    scores = (qr @ (kv[0] * 8**-0.5).mT) * mask
    scores = scores / scores.abs().sum(-1, keepdim=True).clamp(min=1, max=5e4)
    retnet = scores @ kv[1]
    group_norm = lambda x: F.layer_norm(x, (8,), eps=1e-14)  # noqa: E731
    torch.testing.assert_close(group_norm(out), group_norm(retnet), rtol=0, atol=1e-8)


def test_lightning_slopes_follow_alibi():
    for h in (1, 2, 4, 8, 16):
        assert lightning_slopes(h) == tuple(2.0 ** (-8 * (i + 1) / h) for i in range(h))
    assert lightning_slopes(3) == (2**-4, 2**-8, 2**-2)  # 2 heads' slopes, then every other of 4 heads'
    assert lightning_slopes(6) == (2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3)
    assert lightning_decays(4) == tuple(math.exp(-s) for s in lightning_slopes(4))
    layer = lightning_decays(4, layer_idx=1, num_layers=3)  # TransNormerLLM's per-layer scaling
    assert layer == pytest.approx([math.exp(-s * (0.5 + 1e-5)) for s in lightning_slopes(4)], abs=0, rel=1e-15)
    for bad in ({"layer_idx": 1}, {"layer_idx": 3, "num_layers": 3}, {"layer_idx": 0, "num_layers": 1}):
        with pytest.raises(ValueError, match="layer_idx"):
            lightning_decays(4, **bad)


def test_lightning_with_unit_scale_is_lightnings_kernel():
    """Lightning's torch reference: O = [(Q K^T) * M] V, M_ij = exp(-s (i - j)) for j <= i, no scale."""
    q, k, v, _ = inputs(40, 40, False, hq=4, hk=4)
    s = torch.tensor(lightning_slopes(4), dtype=torch.float64)[:, None, None]
    i = torch.arange(40)
    diff = (i[:, None] - i[None, :]).double()
    M = torch.where(diff >= 0, torch.exp(-s * diff.clamp(min=0)), 0.0)
    expected = ((q @ k.mT) * M) @ v
    out = attnzoo.attention(q, k, v, is_causal=True, method="lightning", scale=1.0, chunk_size=16)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-11)


@pytest.mark.parametrize("method", ["retention", "lightning"])
@pytest.mark.parametrize("diagonal", [False, True])
def test_constant_decays_equal_gla_with_the_constant_gate(method, diagonal):
    q, k, v, kv_mask = inputs(45, 45, True, hq=4, hk=2, d=16)
    decays = (1 - 2**-5, 1 - 2**-6) if method == "retention" else lightning_decays(2)
    gate = torch.tensor(decays, dtype=torch.float64).log()[None, :, None].expand(2, 2, 45)
    gate = gate[..., None].expand(2, 2, 45, 16) if diagonal else gate
    for chunk in (5, 64):
        ours = attnzoo.attention(q, k, v, is_causal=True, kv_mask=kv_mask, method=method, chunk_size=chunk)
        theirs = attnzoo.attention(q, k, v, is_causal=True, kv_mask=kv_mask, method="gla", gate=gate.contiguous())
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- gla
def sample_gate(shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return F.logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64) + 2.0)


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("kind", ["diagonal", "scalar", "none", "normalized"])
def test_gla_matches_naive_recurrence(setting, kind):
    q, k, v, kv_mask = inputs(*setting)
    nk, normalize = k.shape[2], kind == "normalized"
    gate = None if kind == "none" else sample_gate((2, 2, nk) if kind == "scalar" else (2, 2, nk, 8))
    params = ({} if gate is None else {"gate": gate}) | ({"normalize": True, "feature_map": "elu"} if normalize else {})
    full_gate = gate if gate is None or gate.dim() == 4 else gate[..., None].expand(*gate.shape, 8)
    expected = naive_gla(q, k, v, full_gate, 8**-0.5, kv_mask, normalize, PHI["elu" if normalize else "identity"])
    for backend in ("chunk", "parallel", "reference"):
        kwargs = {"is_causal": True, "kv_mask": kv_mask, "method": "gla", "backend": backend, "chunk_size": 6}
        torch.testing.assert_close(attnzoo.attention(q, k, v, **kwargs, **params), expected, rtol=0, atol=1e-12)


def extreme_gate(shape, seed=3):
    """Per token and dimension: log decay -20 (forget), -1e-6 (keep) or a trained-like value."""
    gen = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, 3, shape, generator=gen)
    trained = F.logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64) + 3)
    return torch.where(choice == 0, -20.0, torch.where(choice == 1, -1e-6, trained))


@pytest.mark.parametrize("diagonal", [True, False])
def test_gla_extreme_gates_are_finite_and_agree_across_forms(diagonal):
    q, k, v, _ = inputs(100, 100, False, hq=2, hk=1, d=16, seed=4)
    gate = extreme_gate((2, 1, 100, 16) if diagonal else (2, 1, 100))
    gate[:, :, 40:45] = -20.0  # a run of hard resets
    gate[:, :, 60:] = 0.0 if diagonal else gate[:, :, 60:]  # and of exactly no decay

    def run(backend, chunk, dtype=torch.float64):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v, gate)]
        out = attnzoo.attention(
            *leaves[:3], is_causal=True, method="gla", backend=backend, gate=leaves[3], chunk_size=chunk
        )
        out.double().square().sum().backward()
        return [out.double()] + [t.grad.double() for t in leaves]

    gold = run("reference", 64)
    scale = [max(1.0, g.abs().max().item()) for g in gold]
    for backend, chunk in (("chunk", 5), ("chunk", 16), ("chunk", 64), ("parallel", 64)):
        for found, want, s in zip(run(backend, chunk), gold, scale):
            assert found.isfinite().all()
            torch.testing.assert_close(found, want, rtol=0, atol=1e-11 * s)
    for found, want, s in zip(run("chunk", 16, torch.float32), gold, scale):
        assert found.isfinite().all()
        torch.testing.assert_close(found, want, rtol=0, atol=5e-4 * s)


def test_gla_refuses_bad_gates():
    q = torch.randn(2, 2, 16, 8)
    good = sample_gate((2, 2, 16, 8)).float()
    wrong_shapes = [good[:, :, :15], good[..., :7], good[:, :1], torch.zeros(2, 2, 16, 8, dtype=torch.long)]
    wrong_values = [good.clone().index_fill_(2, torch.tensor([3]), x) for x in (0.5, float("nan"), float("-inf"))]
    for gate in wrong_shapes + wrong_values:
        assert_refused("gla", "gate", q, is_causal=True, gate=gate)
    assert_refused("gla", "normalize", q, is_causal=True, normalize=True)  # identity features
    assert_refused("gla", "chunk_size", q, is_causal=True, chunk_size=0)
    assert_refused("gla", "is_causal", q, is_causal=False)


def test_decay_and_block_parameters_are_refused():
    q = torch.randn(2, 2, 16, 8)
    for method in ("retention", "lightning"):
        for decay in (0.0, 1.5, -0.2, float("nan"), (), (0.9, 0.9, 0.9), (0.9, 1.2)):
            assert_refused(method, "decay", q, is_causal=True, decay=decay)
        assert_refused(method, "is_causal", q, is_causal=False)
        attnzoo.attention(q, q, q, is_causal=True, method=method, decay=1.0)  # no decay is allowed
    assert_refused("transnormer", "block_size", q, part="diag", block_size=0)
    for eps in (0.0, -1.0, float("inf")):
        assert_refused("transnormer", "eps", q, eps=eps)
    wrong = DiagState(torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8), None, 5)  # 5 % 4 != 3 keys
    assert_refused("transnormer", "initial_state", q, part="diag", block_size=4, initial_state=wrong)
    with pytest.raises(TypeError, match="initial_state"):
        attnzoo.attention(
            q, q, q, method="transnormer", part="diag", initial_state=LinearState(torch.zeros(2, 2, 8, 8))
        )
    with pytest.raises(TypeError, match="initial_state"):
        attnzoo.attention(q, q, q, method="transnormer", initial_state=wrong)


# ----------------------------------------------------------------------------- transnormer


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("fm,norm", [("elu", "rmsnorm"), ("relu", "layernorm"), ("identity", "none")])
def test_transnormer_norm_part_matches_naive_loop(setting, causal, fm, norm):
    q, k, v, kv_mask = inputs(*setting)
    expected = naive_norm_attention(q, k, v, causal, 8**-0.5, PHI[fm], norm, kv_mask=kv_mask)
    for backend in ("chunk", "parallel", "reference"):
        out = attnzoo.attention(
            q, k, v, is_causal=causal, kv_mask=kv_mask, method="transnormer", backend=backend,
            feature_map=fm, norm=norm, chunk_size=6,
        )  # fmt: skip
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_transnormer_norm_replaces_the_denominator():
    q, k, v, kv_mask = inputs(20, 20, True)
    out = attnzoo.attention(q, k, v, is_causal=True, kv_mask=kv_mask, method="transnormer", eps=1e-12)
    rms = out.square().mean(-1).sqrt()
    seen = torch.ones_like(rms, dtype=torch.bool)
    seen[1, :, :5] = False  # left padding: the first rows see no key and stay 0
    torch.testing.assert_close(rms[seen], torch.ones_like(rms[seen]), rtol=0, atol=1e-9)
    assert torch.equal(out[~seen], torch.zeros_like(out[~seen]))
    # the scale and the magnitude of the queries' features cancel in the norm
    other = attnzoo.attention(q, k, 3 * v, is_causal=True, kv_mask=kv_mask, method="transnormer", eps=1e-12, scale=5.0)
    torch.testing.assert_close(other, out, rtol=0, atol=1e-9)
    ln = attnzoo.attention(q, k, v, is_causal=True, method="transnormer", norm="layernorm", eps=1e-12)
    torch.testing.assert_close(ln.mean(-1), torch.zeros_like(ln[..., 0]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [4, 5, 64])
def test_transnormer_diag_part_matches_naive_loop(setting, causal, block):
    q, k, v, kv_mask = inputs(*setting)
    expected = naive_diag_attention(q, k, v, causal, 8**-0.5, block, kv_mask)
    for backend in ("chunk", "parallel", "reference"):
        kwargs = {"is_causal": causal, "kv_mask": kv_mask, "method": "transnormer", "backend": backend}
        out = attnzoo.attention(q, k, v, **kwargs, part="diag", block_size=block)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_transnormer_diag_layout_visits_only_the_own_block():
    q, k, v, _ = inputs(64, 64, False)
    _, call, _ = prepare(q, k, v, method="transnormer", part="diag", block_size=16)
    layout = diag_layout(call, 16)
    assert layout.kv_num_blocks.flatten().tolist() == [1, 1, 1, 1]
    assert layout.kv_indices[..., 0].flatten().tolist() == [0, 1, 2, 3] and bool(layout.full.all())
    assert layout.density() == pytest.approx(0.25)
    _, call, _ = prepare(q[:, :, :40], k, v, method="transnormer", part="diag", block_size=16)  # offset 24
    layout = diag_layout(call, 16)
    assert layout.kv_indices.flatten().tolist() == [1, 2, 2, 3, 3, -1]  # blocks straddled, the last one alone
    assert not bool(layout.full[layout.listed()].any())


def test_transnormer_decodes_across_block_boundaries():
    q, k, v, _ = inputs(37, 37, False)
    for params in ({"part": "diag", "block_size": 4}, {"part": "norm"}, {"part": "diag", "block_size": 64}):
        full = attnzoo.attention(q, k, v, is_causal=True, method="transnormer", **params)
        state = attnzoo.init_state("transnormer", batch=2, kv_heads=2, head_dim=8, dtype=torch.float64, **params)
        outs, start = [], 0
        for n in (1, 2, 3, 5, 8, 1, 17):
            out, state = attnzoo.step(q[:, :, start : start + n], k[:, :, start : start + n],
                                      v[:, :, start : start + n], state)  # fmt: skip
            outs.append(out)
            start += n
            if params["part"] == "diag":  # the cache holds the current block's keys only
                assert state.inner.key.shape[2] == start % params["block_size"] and state.inner.length == start
        torch.testing.assert_close(torch.cat(outs, 2), full, rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="part"):
            other = "norm" if params["part"] == "diag" else "diag"
            attnzoo.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state, part=other)


@pytest.mark.parametrize("params", [{"part": "norm"}, {"part": "diag", "block_size": 8}], ids=str)
@pytest.mark.parametrize("padded", [False, True])
def test_transnormer_state_continues_a_sequence(params, padded):
    q, k, v, kv_mask = inputs(45, 45, padded)
    kw, t = {"is_causal": True, "method": "transnormer", **params}, 19
    full = attnzoo.attention(q, k, v, kv_mask=kv_mask, **kw)
    m1, m2 = (None, None) if kv_mask is None else (kv_mask[:, :t], kv_mask[:, t:])
    first, state = attnzoo.attention(q[:, :, :t], k[:, :, :t], v[:, :, :t], kv_mask=m1, return_state=True, **kw)
    assert state.length == t
    second = attnzoo.attention(q[:, :, t:], k[:, :, t:], v[:, :, t:], kv_mask=m2, initial_state=state, **kw)
    torch.testing.assert_close(torch.cat([first, second], 2), full, rtol=0, atol=1e-12)
    if not padded:  # decoding continues from the prefill's state
        dec = attnzoo.init_state("transnormer", batch=2, kv_heads=2, head_dim=8, dtype=torch.float64,
                                 initial_state=state, **params)  # fmt: skip
        assert dec.length == t
        out, dec = attnzoo.step(q[:, :, t:], k[:, :, t:], v[:, :, t:], dec)
        torch.testing.assert_close(out, second, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- decoding and training
@pytest.mark.parametrize("method", ["retention", "lightning", "gla"])
def test_decode_equals_the_full_sequence(method):
    q, k, v, _ = inputs(33, 33, False, hq=6, hk=3)
    gate = sample_gate((2, 3, 33, 8))
    per_token = {"gate": gate} if method == "gla" else {}
    full = attnzoo.attention(q, k, v, is_causal=True, method=method, **per_token)
    state = attnzoo.init_state(method, batch=2, kv_heads=3, head_dim=8, dtype=torch.float64)
    outs, start = [], 0
    for n in (1, 4, 1, 11, 16):
        new = slice(start, start + n)
        step_params = {"gate": gate[:, :, new]} if method == "gla" else {}
        out, state = attnzoo.step(q[:, :, new], k[:, :, new], v[:, :, new], state, **step_params)
        outs.append(out)
        start += n
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=0, atol=1e-12)
    assert state.length == 33 and state.inner.length == 33


def test_gla_decode_checks_a_gate_given_at_init():
    q, k, v, _ = inputs(5, 5, False)
    state = attnzoo.init_state("gla", batch=2, kv_heads=2, head_dim=8, dtype=torch.float64, gate=sample_gate((2, 2, 5)))
    with pytest.raises(ValueError, match="gate"):
        attnzoo.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)


TRAINING = [
    ("retention", True, {}),
    ("lightning", True, {"chunk_size": 16}),
    ("gla", True, {"gate": "diagonal", "chunk_size": 16}),
    ("gla", True, {"gate": "scalar", "feature_map": "elu", "normalize": True}),
    ("transnormer", True, {}),
    ("transnormer", False, {"norm": "layernorm"}),
    ("transnormer", True, {"part": "diag", "block_size": 16}),
    ("transnormer", False, {"part": "diag", "block_size": 16}),
]


@pytest.mark.parametrize("method,causal,params", TRAINING, ids=str)
def test_trains_in_bf16(method, causal, params):
    params = dict(params)
    if params.get("gate") is not None:
        shape = (2, 2, 100, 16) if params["gate"] == "diagonal" else (2, 2, 100)
        params["gate"] = sample_gate(shape).to(torch.bfloat16)
    assert_trains(method, causal=causal, **params)
