"""flowformer: the reference and the cumsum backend against a naive float64 loop over queries and
keys from the definition, padding, no causal leak under large magnitudes, a finite competition
without the clamp, decoding, non-causal cross attention, bad parameters and bf16 training."""

import math

import pytest
import torch

import attnzoo
from attnzoo.inputs import build_call
from attnzoo.methods import flowformer
from attnzoo.testing.helpers import assert_refused, assert_trains


def naive_head(fq, fk, v, real, causal, eps, clamp):
    """One query head: ``fq [N, D]``, ``fk [M, D]`` (sigmoid features), ``v [M, Dv]``, ``real`` (M bools)."""
    N, M = fq.shape[0], fk.shape[0]
    zero = torch.zeros_like(fq[0])

    def dot(a, b):
        return float(((a + eps) * (b + eps)).sum())

    def keys(i):  # the real keys query i sees
        return [j for j in range(M) if real[j] and (not causal or j <= i)]

    def queries(j):  # the queries key j's outgoing flow goes to (causal: those seen so far)
        return [i for i in range(N) if not causal or i <= j]

    def limit(x):
        return x if clamp is None else min(x, clamp)

    n_k = [len(keys(i)) for i in range(N)] if causal else [len(keys(0))] * N
    n_q = [j + 1 for j in range(M)] if causal else [N] * M
    inflow = [dot(fq[i], sum((fk[j] for j in keys(i)), zero)) for i in range(N)]
    outflow = [dot(fk[j], sum((fq[i] for i in queries(j)), zero)) for j in range(M)]
    if causal:  # flows rescaled by the element counts (the official code's "normal")
        sink = [
            dot(fq[i], sum((fk[j] * n_q[j] / outflow[j] for j in keys(i)), zero)) / max(n_k[i], 1) for i in range(N)
        ]
        source = [
            limit(dot(fk[j], sum((fq[i] * n_k[i] / inflow[i] for i in queries(j)), zero)) / n_q[j]) for j in range(M)
        ]
        comp = {j: n_k[j] * math.exp(source[j]) / sum(math.exp(source[s]) for s in keys(j)) for j in keys(M)}
        alloc = [1 / (1 + math.exp(-sink[i])) for i in range(N)]
    else:
        sink = [dot(fq[i], sum((fk[j] / outflow[j] for j in keys(0)), zero)) for i in range(N)]
        source = [limit(dot(fk[j], sum((fq[i] / inflow[i] for i in range(N)), zero))) for j in range(M)]
        total = sum(math.exp(source[j]) for j in keys(0))
        comp = {j: n_k[0] * math.exp(source[j]) / total for j in keys(0)}
        alloc = [1 / (1 + math.exp(-sink[i] * N / max(n_k[0], 1))) for i in range(N)]
    out = torch.zeros(N, v.shape[-1], dtype=torch.float64)
    for i in range(N):
        for j in keys(i):
            out[i] += alloc[i] * float(fq[i] @ fk[j]) / inflow[i] * comp[j] * v[j]
    return out


def naive(q, k, v, causal, kv_mask=None, eps=1e-6, clamp=1.0):
    """Flow-Attention by explicit sums in float64, per query head (with its group's key/value head):
    flows I, O, conserved flows, competition and allocation as in the paper's code. Causal: every
    sum over the prefix, counted by n^k_i (real keys <= i) and n^q_j = j + 1."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, N, _ = q.shape
    H, M = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hq, N, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        real = [True] * M if kv_mask is None else kv_mask[b].tolist()
        for hq in range(Hq):
            h = hq // (Hq // H)
            out[b, hq] = naive_head(torch.sigmoid(q[b, hq]), torch.sigmoid(k[b, h]), v[b, h], real, causal, eps, clamp)
    return out


def problem(n=21, m=None, hq=4, h=2, d=6, seed=0, dtype=torch.float64, magnitude=1.0):
    gen = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    q = magnitude * torch.randn(2, hq, n, d, generator=gen, dtype=dtype)
    k = magnitude * torch.randn(2, h, m, d, generator=gen, dtype=dtype)
    v = torch.randn(2, h, m, d, generator=gen, dtype=dtype)
    return q, k, v


def padding(n):
    pos = torch.arange(n)
    return torch.stack([pos < n - 6, pos >= 5])  # right padding on batch 0, left on batch 1


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("params", [{}, {"clamp": None, "eps": 1e-3}, {"clamp": 0.5, "chunk_size": 4}])
def test_matches_the_naive_definition(causal, padded, params):
    q, k, v = problem(magnitude=2.0)
    kv_mask = padding(21) if padded else None
    flow = {n: params[n] for n in ("eps", "clamp") if n in params}
    expected = naive(q, k, v, causal, kv_mask, **flow)
    for backend in ("reference", "cumsum"):
        found = attnzoo.attention(
            q, k, v, is_causal=causal, kv_mask=kv_mask, method="flowformer", backend=backend, **params
        )
        torch.testing.assert_close(found, expected, rtol=0, atol=1e-12)


def test_noncausal_padding_removes_the_keys():
    q, k, v = problem(n=30, seed=1)
    kv_mask = padding(30)
    found = attnzoo.attention(q, k, v, method="flowformer", kv_mask=kv_mask)
    for b in range(2):  # as if the padded keys were not there (a cross-attention call: run directly)
        keep = kv_mask[b]
        qb, kb, vb = q[b : b + 1], k[b : b + 1, :, keep], v[b : b + 1, :, keep]
        call = build_call(qb, kb, vb, None, 0.0, False, None, False, None, False, False)
        alone = flowformer.cumsum(call, flowformer.FlowParams()).out
        torch.testing.assert_close(found[b : b + 1], alone, rtol=0, atol=1e-13)
    nothing = attnzoo.attention(q, k, v, method="flowformer", kv_mask=torch.zeros(2, 30, dtype=torch.bool))
    assert torch.equal(nothing, torch.zeros_like(nothing))


def test_noncausal_cross_attention_is_defined():
    # enabled in the code, not in the capabilities (which would also turn on causal cross attention)
    q, k, v = problem(n=13, m=29, seed=2)
    call = build_call(q, k, v, None, 0.0, False, None, False, padding(29), False, False)
    p = flowformer.FlowParams()
    expected = naive(q, k, v, False, padding(29))
    torch.testing.assert_close(flowformer.reference(call, p).out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(flowformer.cumsum(call, p).out, expected, rtol=0, atol=1e-12)
    assert_refused("flowformer", "key", q, k)


@pytest.mark.parametrize("backend", ["reference", "cumsum"])
@pytest.mark.parametrize("clamp", [1.0, None])
def test_no_causal_leak_under_large_magnitudes(backend, clamp):
    q, k, v = problem(n=60, seed=3)
    t = 25
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    gen = torch.Generator().manual_seed(9)
    q2[:, :, t + 1 :] = 40 * torch.randn(q2[:, :, t + 1 :].shape, generator=gen, dtype=torch.float64)
    k2[:, :, t + 1 :] = -40 * torch.rand(k2[:, :, t + 1 :].shape, generator=gen, dtype=torch.float64)
    v2[:, :, t + 1 :] = 1e4
    kw = {"is_causal": True, "method": "flowformer", "backend": backend, "clamp": clamp, "chunk_size": 8}
    before, after = attnzoo.attention(q, k, v, **kw), attnzoo.attention(q2, k2, v2, **kw)
    assert torch.equal(before[:, :, : t + 1], after[:, :, : t + 1])
    assert (before[:, :, t + 1 :] - after[:, :, t + 1 :]).abs().max() > 1.0


def test_competition_stays_finite_without_the_clamp():
    # key features ~ e^-40: outgoing flows ~ eps^2, conserved flows ~ 1e12; exp would overflow float32
    q, k, v = problem(n=200, seed=4)
    k = k - 40.0
    gold = attnzoo.attention(q, k, v, is_causal=True, method="flowformer", backend="reference", clamp=None)
    assert gold.isfinite().all()
    for causal in (True, False):
        args = [t.float().requires_grad_() for t in (q, k, v)]
        found = attnzoo.attention(*args, is_causal=causal, method="flowformer", clamp=None)
        found.square().sum().backward()
        assert found.isfinite().all() and all(t.grad.isfinite().all() for t in args)
        if causal:
            torch.testing.assert_close(found.double(), gold, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_equals_the_full_sequence(dtype):
    q, k, v = problem(n=40, seed=5, dtype=dtype)
    full = attnzoo.attention(q, k, v, is_causal=True, method="flowformer", backend="reference", clamp=None)
    state = attnzoo.init_state("flowformer", batch=2, kv_heads=2, head_dim=6, dtype=dtype, clamp=None)
    empty_size = state.size_bytes()
    outs, start = [], 0
    for n in (1, 1, 7, 1, 20, 10):
        new = slice(start, start + n)
        out, state = attnzoo.step(q[:, :, new], k[:, :, new], v[:, :, new], state)
        outs.append(out)
        start += n
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=0, atol=tol)
    per_head = (6 * 6 + 4 * 6 + 1) * q.element_size()  # state, four sums, log normaliser
    assert empty_size == (2 * 2 * per_head + 2 * q.element_size())  # kv heads at init (and the key counts)
    assert state.length == 40 and state.size_bytes() == 2 * 4 * per_head + 2 * q.element_size()
    with pytest.raises(ValueError, match="query"):
        attnzoo.step(q[:, :2, :1], k[:, :, :1], v[:, :, :1], state)


def test_trains_in_bf16():
    assert_trains("flowformer")
    assert_trains("flowformer", causal=False)
    assert_trains("flowformer", clamp=None, chunk_size=16, kv_heads=1)


@pytest.mark.parametrize(
    "argument,kwargs",
    [
        ("eps", {"eps": 0.0}),
        ("eps", {"eps": -1e-6}),
        ("eps", {"eps": float("nan")}),
        ("clamp", {"clamp": 0.0}),
        ("clamp", {"clamp": float("inf")}),
        ("chunk_size", {"chunk_size": 0}),
        ("attn_mask", {"attn_mask": torch.ones(16, 16, dtype=torch.bool)}),
    ],
)
def test_bad_parameters_are_refused(argument, kwargs):
    assert_refused("flowformer", argument, torch.randn(2, 2, 16, 8), **kwargs)


def test_wrong_types_are_refused():
    q = torch.randn(2, 2, 16, 8)
    for kwargs in ({"clamp": "1"}, {"eps": None}, {"chunk_size": 2.0}):
        with pytest.raises(TypeError, match=next(iter(kwargs))):
            attnzoo.attention(q, q, q, method="flowformer", **kwargs)
