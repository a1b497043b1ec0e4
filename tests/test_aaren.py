"""aaren: the prefix scan against a naive float64 loop over prefixes, equality with dense softmax
attention of the repeated token, stability at large scores, decoding, refusal of varying queries,
memory and bf16 training."""

import math

import pytest
import torch

import attnzoo
from attnzoo.methods import aaren
from attnzoo.testing.helpers import LargestAllocation, assert_refused

SETTINGS = [  # (Nq, Nk, q_heads, kv_heads, padded)
    (23, 23, 2, 2, False),
    (23, 23, 4, 2, True),
    (11, 30, 4, 1, False),
    (30, 11, 2, 2, True),
    (1, 1, 2, 2, False),
]


def make(nq, nk, hq, hkv, padded, seed=0, dtype=torch.float64, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    token = torch.randn(2, hq, 1, 8, generator=gen, dtype=dtype) * spread
    k = torch.randn(2, hkv, nk, 8, generator=gen, dtype=dtype)
    v = torch.randn(2, hkv, nk, 6, generator=gen, dtype=dtype)
    kv_mask = None
    if padded:  # left padding on batch 0, right padding on batch 1
        pos = torch.arange(nk)
        kv_mask = torch.stack([pos >= nk // 3, pos < nk - nk // 4])
    return token, k, v, kv_mask


def naive(token, k, v, kv_mask, nq, scale):
    """Row i: softmax of token . k_j * scale over the real keys j <= i + Nk - Nq, one prefix at a time."""
    B, hq, _, _ = token.shape
    nk, g = k.shape[2], hq // k.shape[1]
    out = torch.zeros(B, hq, nq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, hq, nq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(hq):
            for i in range(nq):
                keys = [j for j in range(nk) if j <= i + nk - nq and (kv_mask is None or kv_mask[b, j])]
                if not keys:
                    continue
                s = [float(token[b, h, 0].double() @ k[b, h // g, j].double()) * scale for j in keys]
                top = max(s)
                w = [math.exp(x - top) for x in s]
                total = sum(w)
                lse[b, h, i] = top + math.log(total)
                for wj, j in zip(w, keys):
                    out[b, h, i] += wj / total * v[b, h // g, j].double()
    return out, lse


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_scan_matches_a_naive_loop_over_prefixes(setting, chunk_size):
    nq, hq = setting[0], setting[2]
    token, k, v, kv_mask = make(*setting)
    q = token.expand(2, hq, nq, 8)
    expected, expected_lse = naive(token, k, v, kv_mask, nq, 0.3)
    for backend in ("scan", "reference"):
        out, lse = attnzoo.attention(
            q, k, v, is_causal=True, scale=0.3, kv_mask=kv_mask, method="aaren", backend=backend,
            return_lse=True, chunk_size=chunk_size,
        )  # fmt: skip
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse, expected_lse, rtol=0, atol=1e-12)


def test_equals_dense_softmax_attention_of_the_repeated_token():
    token, k, v, kv_mask = make(40, 40, 4, 2, True)
    q = token.expand(2, 4, 40, 8)
    found = attnzoo.attention(q, k, v, is_causal=True, kv_mask=kv_mask, method="aaren", chunk_size=7)
    dense = attnzoo.attention(q, k, v, is_causal=True, kv_mask=kv_mask, method="dense", backend="reference")
    torch.testing.assert_close(found, dense, rtol=0, atol=1e-12)
    assert attnzoo.get_method("aaren").exact and attnzoo.get_method("aaren").shared_query


@pytest.mark.parametrize("spread", [1e2, 1e3, 1e4])
def test_scan_is_stable_for_large_scores(spread):
    """Scores of +-1e3 and more: no exponential of a positive number, hence no overflow or 0/0."""
    token, k, v, kv_mask = make(300, 300, 2, 2, True, spread=spread)
    q = token.expand(2, 2, 300, 8)
    gold = attnzoo.attention(q, k, v, is_causal=True, kv_mask=kv_mask, method="aaren", backend="reference")
    exact = attnzoo.attention(q, k, v, is_causal=True, kv_mask=kv_mask, method="aaren", chunk_size=16)
    torch.testing.assert_close(exact, gold, rtol=0, atol=1e-12)
    tok32 = token.float().requires_grad_()
    k32, v32 = (t.float().requires_grad_() for t in (k, v))
    out = attnzoo.attention(
        tok32.expand(2, 2, 300, 8), k32, v32, is_causal=True, kv_mask=kv_mask, method="aaren", chunk_size=16
    )
    assert out.isfinite().all()
    # float32 rounds scores of size S by ~S * 6e-8 before the softmax: compare the float32 run with
    # the float32 reference, within a small multiple of the reference's own error
    ref32 = attnzoo.attention(
        tok32.detach().expand(2, 2, 300, 8), k32.detach(), v32.detach(), is_causal=True, kv_mask=kv_mask,
        method="aaren", backend="reference",
    )  # fmt: skip
    assert (out.double() - gold).abs().max() <= max(1e-5, 2 * (ref32.double() - gold).abs().max())
    out.square().sum().backward()
    assert all(t.grad.isfinite().all() for t in (tok32, k32, v32))


def test_gradient_reaches_the_token_through_expand():
    token, k, v, kv_mask = make(30, 30, 4, 2, True)
    grads = []
    for backend in ("scan", "reference"):
        leaves = [t.clone().requires_grad_() for t in (token, k, v)]
        q = leaves[0].expand(2, 4, 30, 8)
        out, lse = attnzoo.attention(
            q, *leaves[1:], is_causal=True, kv_mask=kv_mask, method="aaren", backend=backend, return_lse=True,
            chunk_size=4,
        )  # fmt: skip
        (out.sin().sum() + torch.where(lse.isfinite(), lse, 0.0).sum()).backward()
        grads.append([t.grad for t in leaves])
    for found, expected in zip(*grads):
        torch.testing.assert_close(found, expected, rtol=0, atol=1e-11)


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_decode_equals_the_full_sequence_with_a_constant_size_state(chunk_size):
    token, k, v, _ = make(50, 50, 4, 2, False, spread=30.0)
    q = token.expand(2, 4, 50, 8)
    full = attnzoo.attention(q, k, v, is_causal=True, method="aaren", chunk_size=chunk_size)
    state = attnzoo.init_state("aaren", batch=2, kv_heads=2, head_dim=8, value_dim=6, dtype=torch.float64,
                               chunk_size=chunk_size)  # fmt: skip
    outs, start, sizes = [], 0, []
    for n in (1, 1, 7, 1, 20, 1, 19):
        sl = slice(start, start + n)
        out, state = attnzoo.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state)
        outs.append(out)
        sizes.append(state.size_bytes())
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=0, atol=1e-12)
    assert state.length == 50 and len(set(sizes)) == 1  # O(1) in the position
    inner = state.inner
    assert inner.m.shape == (2, 4) and inner.a.shape == (2, 4, 6) and inner.m.dtype == torch.float64
    # (m, c, a) is the paper's state: running max, sum exp(s - m), sum exp(s - m) v
    s = (token[:, :, 0, None] * k.repeat_interleave(2, 1)).sum(-1) / math.sqrt(8)
    torch.testing.assert_close(inner.m, s.amax(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(inner.c, torch.exp(s - inner.m[..., None]).sum(-1), rtol=1e-12, atol=0)


def test_decode_in_float32_keeps_a_float32_state():
    token, k, v, _ = make(9, 9, 2, 2, False, dtype=torch.bfloat16)
    state = attnzoo.init_state("aaren", batch=2, kv_heads=2, head_dim=8, value_dim=6, dtype=torch.bfloat16)
    out, state = attnzoo.step(token, k[:, :, :1], v[:, :, :1], state)
    assert out.dtype == torch.bfloat16 and state.inner.a.dtype == torch.float32


def test_varying_queries_are_refused():
    token, k, v, _ = make(16, 16, 2, 2, False)
    q = token.expand(2, 2, 16, 8).clone()
    q[1, 0, 9, 3] += 1e-9
    message = assert_refused("aaren", "query", q, k, is_causal=True)
    assert "varies along the sequence" in message
    assert_refused("aaren", "is_causal", token.expand(2, 2, 16, 8), k, is_causal=False)
    assert_refused("aaren", "chunk_size", token.expand(2, 2, 16, 8), k, is_causal=True, chunk_size=0)
    state = attnzoo.init_state("aaren", batch=2, kv_heads=2, head_dim=8, value_dim=6, dtype=torch.float64)
    _, state = attnzoo.step(token, k[:, :, :1], v[:, :, :1], state)
    with pytest.raises(ValueError, match="query"):  # another token in a later step
        attnzoo.step(token + 1, k[:, :, 1:2], v[:, :, 1:2], state)
    with pytest.raises(ValueError, match="query"):  # a query varying within a step
        attnzoo.step(torch.cat([token, token + 1], 2), k[:, :, 1:3], v[:, :, 1:3], state)
    with pytest.raises(ValueError, match="value"):
        attnzoo.step(token, k[:, :, 1:2], v[:, :, 1:2, :5], state)


def test_scan_never_allocates_an_n_by_n_tensor():
    n, c = 2048, 32
    token = torch.randn(1, 1, 1, 16, requires_grad=True)
    k, v = (torch.randn(1, 1, n, 16, requires_grad=True) for _ in range(2))
    tracker = LargestAllocation()
    with tracker:
        out = attnzoo.attention(token.expand(1, 1, n, 16), k, v, is_causal=True, method="aaren", chunk_size=c)
        out.square().sum().backward()
    assert k.grad is not None and tracker.largest > 0
    assert tracker.largest <= n * c, tracker.largest  # the per-chunk [C, C] weights: N * C, not N * N


def test_trains_in_bfloat16():
    token = torch.randn(1, 4, 1, 16, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 100, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = attnzoo.attention(token.expand(2, 4, 100, 16), k, v, is_causal=True, method="aaren")
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    assert all(t.grad.dtype == torch.bfloat16 and t.grad.isfinite().all() for t in (token, k, v))


def test_prefix_softmax_takes_an_initial_state():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 1, 3, 20, generator=gen, dtype=torch.float64) * 50
    v = torch.randn(2, 1, 20, 5, generator=gen, dtype=torch.float64)
    whole, whole_lse = aaren.prefix_softmax(s, v, chunk_size=6)
    head, head_lse = aaren.prefix_softmax(s[..., :8], v[:, :, :8], chunk_size=6)
    tail, tail_lse = aaren.prefix_softmax(
        s[..., 8:], v[:, :, 8:], chunk_size=6, initial=(head[..., -1, :], head_lse[..., -1])
    )
    torch.testing.assert_close(torch.cat([head, tail], 3), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([head_lse, tail_lse], 3), whole_lse, rtol=0, atol=1e-12)
