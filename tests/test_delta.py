"""delta and gated_delta: a naive float64 token loop from the definition, the core's three forms
(outputs and gradients), the delta rule's overwrite property, extreme write strengths and gates,
zero and padded keys, qk_norm, decoding, bad parameters and bf16 training."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.api import prepare
from attnzoo.methods import _recurrent as rec
from attnzoo.methods import delta
from attnzoo.testing.helpers import assert_refused, assert_trains


def naive(q, k, v, beta=None, gate=None, scale=None, qk_norm=True, kv_mask=None):
    """S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_i = S_{i + Nk - Nq}^T (scale q_i),
    one state per key/value head, token by token in float64 (a padded key writes nothing)."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Nq, D = q.shape
    H, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    unit = lambda x: x / x.norm() if qk_norm and x.norm() > 0 else x  # noqa: E731
    out = torch.zeros(B, Hq, Nq, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S, states = torch.zeros(D, Dv, dtype=torch.float64), []
            for t in range(Nk):
                kt = unit(k[b, h, t])
                if kv_mask is not None and not kv_mask[b, t]:
                    kt = torch.zeros_like(kt)
                bt = 1.0 if beta is None else float(beta[b, h, t])
                alpha = 1.0 if gate is None else math.exp(float(gate[b, h, t]))
                S = alpha * (S - bt * torch.outer(kt, kt @ S)) + bt * torch.outer(kt, v[b, h, t])
                states.append(S)
            for hq in range(h * (Hq // H), (h + 1) * (Hq // H)):
                for i in range(Nq):
                    j = i + Nk - Nq
                    if j >= 0:
                        out[b, hq, i] = states[j].T @ (unit(q[b, hq, i]) * scale)
    return out


def problem(nq=23, nk=23, hq=4, h=2, d=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, nq, d, generator=gen, dtype=dtype)
    k, v = (torch.randn(2, h, nk, d, generator=gen, dtype=dtype) for _ in range(2))
    beta = 2 * torch.rand(2, h, nk, generator=gen, dtype=dtype)
    gate = F.logsigmoid(torch.randn(2, h, nk, generator=gen, dtype=dtype) + 1)
    return q, k, v, beta, gate


SETTINGS = [  # (Nq, Nk, padded)
    (23, 23, False),
    (23, 23, True),
    (11, 30, False),
    (30, 11, True),
]


@pytest.mark.parametrize("method", ["delta", "gated_delta"])
@pytest.mark.parametrize("nq,nk,padded", SETTINGS)
def test_matches_the_naive_token_loop(method, nq, nk, padded):
    q, k, v, beta, gate = problem(nq, nk)
    kv_mask = None
    if padded:  # right padding on batch 0, left padding on batch 1
        pos = torch.arange(nk)
        kv_mask = torch.stack([pos < nk - 5, pos >= 4])
    params = {"beta": beta} | ({"gate": gate} if method == "gated_delta" else {})
    expected = naive(q, k, v, scale=0.7, kv_mask=kv_mask, **params)
    for backend, chunk in (("reference", 64), ("chunk", 5), ("chunk", 64)):
        found = attnzoo.attention(
            q,
            k,
            v,
            is_causal=True,
            scale=0.7,
            kv_mask=kv_mask,
            method=method,
            backend=backend,
            chunk_size=chunk,
            **params,
        )
        torch.testing.assert_close(found, expected, rtol=0, atol=1e-12)


def test_gated_without_gate_equals_delta_and_beta_none_is_one():
    q, k, v, beta, _ = problem()
    a = attnzoo.attention(q, k, v, is_causal=True, method="delta", beta=beta)
    b = attnzoo.attention(q, k, v, is_causal=True, method="gated_delta", beta=beta)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    ones = torch.ones_like(beta)
    c = attnzoo.attention(q, k, v, is_causal=True, method="delta", beta=ones)
    torch.testing.assert_close(attnzoo.attention(q, k, v, is_causal=True, method="delta"), c, rtol=0, atol=1e-13)


@pytest.mark.parametrize("gated", [False, True])
def test_the_core_three_forms_agree_with_gradients(gated):
    q, k, v, beta, gate = problem(nq=37, nk=37, seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta, gate)]
    build = delta.build_gated if gated else delta.build

    def run(form, chunk):
        params = {"beta": leaves[3], "chunk_size": chunk} | ({"gate": leaves[4]} if gated else {})
        method = "gated_delta" if gated else "delta"
        _, call, p = prepare(*leaves[:3], is_causal=True, method=method, **params)
        out = rec.form_runner(build, form)(call, p).out
        used = leaves if gated else leaves[:4]
        return [out.detach(), *torch.autograd.grad((out * out.sin()).sum(), used)]

    gold = run("recurrent", 64)
    for form, chunk in (("parallel", 64), ("chunk", 16), ("chunk", 5), ("chunk", 1)):
        for found, expected in zip(run(form, chunk), gold):
            scale = max(1.0, expected.abs().max().item())
            assert (found - expected).abs().max().item() <= 1e-11 * scale, (form, chunk)


def test_a_repeated_key_stores_only_its_last_value():
    # beta = 1, unit keys: each write replaces the value stored under its key (the delta rule's defining property)
    d, n = 8, 20
    basis = torch.eye(d, dtype=torch.float64)
    order = [2, 2, 5, 0, 7, 2, 1, 3, 5, 6, 4, 2, 0, 5, 2, 7, 1, 6, 2, 3]
    k = basis[order].expand(1, 1, n, d).contiguous()
    v = torch.randn(1, 1, n, 6, dtype=torch.float64)
    q = k.clone()  # query t asks for the value of key t
    out, state = attnzoo.attention(q, k, v, is_causal=True, scale=1.0, method="delta", chunk_size=4, return_state=True)
    last = {key: t for t, key in enumerate(order)}
    expected = torch.zeros(d, 6, dtype=torch.float64)
    for key, t in last.items():
        expected[key] = v[0, 0, t]
    torch.testing.assert_close(state.state[0, 0], expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(out, v, rtol=0, atol=1e-13)  # reading key t right after writing it gives v_t
    assert state.length == n
    # the additive rule would instead hold the sum of every value written under key 2
    assert (state.state[0, 0, 2] - v[0, 0, [t for t, key in enumerate(order) if key == 2]].sum(0)).abs().max() > 0.1


@pytest.mark.parametrize("method", ["delta", "gated_delta"])
def test_extreme_betas(method):
    q, k, v, _, gate = problem(nq=300, nk=300, seed=2)
    extra = {"gate": gate} if method == "gated_delta" else {}
    zero = attnzoo.attention(q, k, v, is_causal=True, method=method, beta=torch.zeros(2, 2, 300), **extra)
    assert torch.equal(zero, torch.zeros_like(zero))  # beta = 0 writes nothing
    two = torch.full((2, 2, 300), 2.0, dtype=torch.float64)
    # beta = 2: the transition reflects the state (eigenvalue -1 along k): bounded, no blow-up
    found, state = attnzoo.attention(
        q, k, v, is_causal=True, method=method, beta=two, chunk_size=16, return_state=True, **extra
    )
    assert found.isfinite().all() and state.state.norm(dim=(-2, -1)).max() < 10 * v.abs().max() * math.sqrt(300)
    reference = attnzoo.attention(q, k, v, is_causal=True, method=method, backend="reference", beta=two, **extra)
    torch.testing.assert_close(found, reference, rtol=0, atol=1e-10)
    head = slice(0, 30)
    expected = naive(q[:, :, head], k[:, :, head], v[:, :, head], two[:, :, head], gate[:, :, head] if extra else None)
    torch.testing.assert_close(found[:, :, head], expected, rtol=0, atol=1e-12)


def test_extreme_gates_reset_and_hold():
    q, k, v, beta, _ = problem(nq=200, nk=200, seed=3)
    gen = torch.Generator().manual_seed(5)
    gate = torch.where(torch.rand(2, 2, 200, generator=gen) < 0.1, -30.0, 0.0).double()  # resets among no-decay
    gate[:, :, 0] = 0.0
    for dtype in (torch.float64, torch.float32):
        args = [t.to(dtype) for t in (q, k, v)]
        found = attnzoo.attention(*args, is_causal=True, method="gated_delta", beta=beta, gate=gate, chunk_size=16)
        ref = attnzoo.attention(*args, is_causal=True, method="gated_delta", backend="reference", beta=beta, gate=gate)
        assert found.isfinite().all()
        torch.testing.assert_close(found.double(), ref.double(), rtol=0, atol=1e-10 if dtype == torch.float64 else 1e-4)
    # after a reset (decay e^-30) the output depends only on tokens since the reset
    t = int(torch.nonzero(gate[0, 0, 50:] == -30.0)[0]) + 50
    cut = attnzoo.attention(
        q[:, :, t:],
        k[:, :, t:],
        v[:, :, t:],
        is_causal=True,
        method="gated_delta",
        beta=beta[:, :, t:],
        gate=gate[:, :, t:],
    )
    full = attnzoo.attention(q, k, v, is_causal=True, method="gated_delta", beta=beta, gate=gate)
    assert (cut[0, :2] - full[0, :2, t:]).abs().max() < 1e-11  # heads of kv head 0
    delta_out = attnzoo.attention(q, k, v, is_causal=True, method="delta", beta=beta)
    no_decay = attnzoo.attention(q, k, v, is_causal=True, method="gated_delta", beta=beta, gate=torch.zeros_like(gate))
    torch.testing.assert_close(no_decay, delta_out, rtol=0, atol=1e-12)


def test_zero_and_padded_keys_give_no_nan():
    q, k, v, beta, gate = problem(nq=40, nk=40, seed=4, dtype=torch.float32)
    k[0, :, 3] = 0.0  # a real zero key: normalised to 0 (no write), not NaN
    kv_mask = torch.ones(2, 40, dtype=torch.bool)
    kv_mask[1, :10] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attnzoo.attention(*leaves, is_causal=True, method="gated_delta", kv_mask=kv_mask, beta=beta, gate=gate)
    out.square().sum().backward()
    assert out.isfinite().all() and all(t.grad.isfinite().all() for t in leaves)
    assert leaves[1].grad[1, :, :10].abs().max() == 0  # padded keys do not matter
    expected = naive(q, k, v, beta, gate, kv_mask=kv_mask)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_qk_norm_false_takes_the_features_as_given():
    q, k, v, beta, _ = problem(seed=5)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    inside = attnzoo.attention(q, k, v, is_causal=True, method="delta", beta=beta)
    given = attnzoo.attention(qn, kn, v, is_causal=True, method="delta", beta=beta, qk_norm=False)
    torch.testing.assert_close(given, inside, rtol=0, atol=1e-13)
    torch.testing.assert_close(given, naive(qn, kn, v, beta, qk_norm=False), rtol=0, atol=1e-13)
    # the documented requirement: a key of norm 2 gives the eigenvalue 1 - 4 = -3 along it, and the state explodes
    k2 = torch.zeros(1, 1, 30, 8, dtype=torch.float64)
    k2[..., 0] = 2.0
    v2 = torch.randn(1, 1, 30, 8, dtype=torch.float64)
    big = attnzoo.attention(k2, k2, v2, is_causal=True, method="delta", qk_norm=False)
    assert big[0, 0, -1].abs().max() > 1e12
    unit = attnzoo.attention(k2, k2, v2, is_causal=True, scale=1.0, method="delta")  # normalised inside
    torch.testing.assert_close(unit, v2, rtol=0, atol=1e-13)


def test_decode_with_per_token_parameters():
    q, k, v, beta, gate = problem(nq=30, nk=30, seed=6)
    full = attnzoo.attention(q, k, v, is_causal=True, method="gated_delta", beta=beta, gate=gate)
    state = attnzoo.init_state("gated_delta", batch=2, kv_heads=2, head_dim=8, dtype=torch.float64)
    outs, start = [], 0
    for n in (1, 4, 1, 16, 8):
        new = slice(start, start + n)
        out, state = attnzoo.step(
            q[:, :, new], k[:, :, new], v[:, :, new], state, beta=beta[:, :, new], gate=gate[:, :, new]
        )
        outs.append(out)
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=0, atol=1e-12)
    assert state.length == 30 and state.size_bytes() == 2 * 2 * 8 * 8 * 8
    with pytest.raises(ValueError, match="beta"):  # a step's beta covers the step's tokens
        attnzoo.step(q[:, :, :2], k[:, :, :2], v[:, :, :2], state, beta=beta)


def test_trains_in_bf16():
    beta = 2 * torch.rand(2, 2, 100)
    assert_trains("delta", beta=beta)
    assert_trains("gated_delta", beta=beta, gate=F.logsigmoid(torch.randn(2, 2, 100)), chunk_size=16)
    assert_trains("delta", kv_heads=1, beta=beta[:, :1], qk_norm=True, chunk_size=5)


BAD = [  # (method, argument, kwargs); the query is [2, 2, 16, 8]
    ("delta", "beta", {"beta": torch.rand(2, 2, 15)}),
    ("delta", "beta", {"beta": torch.rand(2, 1, 16)}),
    ("delta", "beta", {"beta": torch.full((2, 2, 16), 2.5)}),
    ("delta", "beta", {"beta": torch.full((2, 2, 16), -0.1)}),
    ("delta", "beta", {"beta": torch.full((2, 2, 16), float("nan"))}),
    ("delta", "beta", {"beta": torch.ones(2, 2, 16, dtype=torch.long)}),
    ("delta", "gate", {"gate": torch.zeros(2, 2, 16)}),  # delta has no gate
    ("delta", "chunk_size", {"chunk_size": 0}),
    ("delta", "is_causal", {"is_causal": False}),
    ("gated_delta", "gate", {"gate": torch.full((2, 2, 16), 0.1)}),
    ("gated_delta", "gate", {"gate": torch.full((2, 2, 16), float("nan"))}),
    ("gated_delta", "gate", {"gate": torch.full((2, 2, 16), -float("inf"))}),
    ("gated_delta", "gate", {"gate": torch.zeros(2, 2, 16, 8)}),  # no diagonal gates
    ("gated_delta", "gate", {"gate": torch.zeros(2, 2, 17)}),
    ("gated_delta", "beta", {"beta": torch.full((2, 2, 16), 3.0)}),
]


@pytest.mark.parametrize("method,argument,kwargs", BAD)
def test_bad_parameters_are_refused(method, argument, kwargs):
    assert_refused(method, argument, torch.randn(2, 2, 16, 8), **{"is_causal": True, **kwargs})


def test_wrong_types_are_refused():
    q = torch.randn(2, 2, 16, 8)
    for kwargs in ({"beta": [1.0] * 16}, {"qk_norm": 1}, {"gate": 0.5}):
        with pytest.raises(TypeError, match=next(iter(kwargs))):
            attnzoo.attention(q, q, q, is_causal=True, method="gated_delta", **kwargs)
