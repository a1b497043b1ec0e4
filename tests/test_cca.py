"""``cca``: what each query sees (raw keys and cores) against a brute-force reading of the
definition, the core tokens against a loop, the fast path's layouts, the degenerate limit, bad
parameters and low-precision training."""

import math

import pytest
import torch

import attnzoo
import attnzoo.api
import attnzoo.methods.cca
from attnzoo.api import prepare
from attnzoo.methods.cca import core_layout, core_tokens, raw_layout, visibility
from attnzoo.testing.helpers import assert_refused, assert_trains


def _call(n, causal, group_size, window, heads=(2, 2), kv_mask=None, dtype=torch.float64, dim=8):
    q = torch.randn(2, heads[0], n, dim, dtype=dtype)
    k, v = (torch.randn(2, heads[1], n, dim, dtype=dtype) for _ in range(2))
    _, call, params = prepare(
        q, k, v, is_causal=causal, method="cca", kv_mask=kv_mask, group_size=group_size, window=window
    )
    return call, params


def _brute_force(n, causal, g, w):
    """(raw [n, n], cores [n, nG]) by reading the definition one query at a time."""
    n_groups = math.ceil(n / g)
    raw = torch.zeros(n, n, dtype=torch.bool)
    cores = torch.zeros(n, n_groups, dtype=torch.bool)
    for t in range(n):
        if causal:
            start = (max(t - w + 1, 0) // g) * g
            for j in range(start, t + 1):
                raw[t, j] = True
            for c in range(n_groups):
                cores[t, c] = (c + 1) * g - 1 < start
        else:
            for c in range(n_groups):
                members = range(c * g, min((c + 1) * g, n))
                if any(t - w <= j <= t + w for j in members):
                    for j in members:
                        raw[t, j] = True
                else:
                    cores[t, c] = True
    return raw, cores


CONFIGS = [(37, 4, 6), (40, 5, 1), (23, 1, 3), (30, 7, 20), (16, 16, 3), (9, 3, 40)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,g,w", CONFIGS)
def test_visibility_matches_the_definition_and_counts_every_key_once(n, g, w, causal):
    call, params = _call(n, causal, g, w)
    raw, cores = visibility(call, params)
    want_raw, want_cores = _brute_force(n, causal, g, w)
    assert torch.equal(raw, want_raw) and torch.equal(cores, want_cores)
    members = torch.arange(n)[None, :] // g == torch.arange(cores.shape[1])[:, None]  # [nG, n]
    via_cores = (cores.long() @ members.long()) > 0  # keys covered by a visible core
    assert not (raw & via_cores).any()  # counted once
    reachable = torch.arange(n)[None, :] <= torch.arange(n)[:, None] if causal else torch.ones(n, n, dtype=torch.bool)
    assert torch.equal(raw | via_cores, reachable)  # and every reachable key is counted


def _dense_tiles(layout, n_q, n_k):
    """A tile layout (keys in place) as a bool [n_q, n_k] matrix."""
    assert layout.key_source is None
    dense = torch.zeros(n_q + 1, n_k + 1, dtype=torch.bool)
    for t in range(layout.num_tiles):
        mask = layout.masks[layout.mask_id[t]]
        rows = layout.q_index[t].clamp(min=-1)
        cols = layout.k_index[t]
        dense[rows[:, None], cols[None, :]] |= mask
    return dense[:n_q, :n_k]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,g,w", [(200, 4, 6), (150, 16, 64), (300, 5, 7), (70, 2, 2)])
def test_fast_path_layouts_cover_exactly_the_definition(n, g, w, causal):
    call, params = _call(n, causal, g, w)
    raw, cores = visibility(call, params)
    assert torch.equal(_dense_tiles(raw_layout(call, params), n, n), raw)
    assert torch.equal(core_layout(call, params).to_dense()[0, 0], cores)


def _core_loop(q, k, v, kv_mask, g, scale):
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    n_groups = math.ceil(n / g)
    ck = torch.zeros(B, Hkv, n_groups, D, dtype=q.dtype)
    cv = torch.zeros(B, Hkv, n_groups, v.shape[-1], dtype=q.dtype)
    valid = torch.zeros(B, n_groups, dtype=torch.bool)
    for b in range(B):
        for c in range(n_groups):
            real = [j for j in range(c * g, min((c + 1) * g, n)) if kv_mask is None or kv_mask[b, j]]
            if not real:
                continue
            valid[b, c] = True
            for h in range(Hkv):
                heads = range(h * Hq // Hkv, (h + 1) * Hq // Hkv)
                q_last = torch.stack([q[b, i, real[-1]] for i in heads]).mean(0)
                w = torch.softmax(torch.stack([q_last @ k[b, h, j] * scale for j in real]), 0)
                ck[b, h, c] = sum(wj * k[b, h, j] for wj, j in zip(w, real))
                cv[b, h, c] = sum(wj * v[b, h, j] for wj, j in zip(w, real))
    return ck, cv, valid


@pytest.mark.parametrize("heads", [(2, 2), (4, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_core_tokens_match_a_loop(heads, padded):
    n, g = 19, 4
    kv_mask = torch.tensor([[True] * 13 + [False] * 6, [False] * 9 + [True] * 10]) if padded else None
    call, params = _call(n, True, g, 3, heads=heads, kv_mask=kv_mask)
    found = core_tokens(call, params)
    want = _core_loop(call.query, call.key, call.value, kv_mask, g, call.scale)
    for a, b in zip(found, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_group_size_one_is_dense_attention(causal):
    q = torch.randn(2, 4, 90, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 90, 16, dtype=torch.float64) for _ in range(2))
    kv_mask = torch.arange(90)[None] < torch.tensor([[90], [61]])
    dense = attnzoo.attention(q, k, v, is_causal=causal, kv_mask=kv_mask)
    found = attnzoo.attention(q, k, v, is_causal=causal, kv_mask=kv_mask, method="cca", group_size=1, window=5)
    torch.testing.assert_close(found, dense, rtol=0, atol=1e-12)


def test_cores_change_the_output_of_far_queries_only():
    """A query whose window holds every key it may see is plain causal attention; later ones differ."""
    q, k, v = (torch.randn(1, 2, 64, 8, dtype=torch.float64) for _ in range(3))
    dense = attnzoo.attention(q, k, v, is_causal=True)
    found = attnzoo.attention(q, k, v, is_causal=True, method="cca", group_size=4, window=8)
    torch.testing.assert_close(found[:, :, :8], dense[:, :, :8], rtol=0, atol=1e-12)
    assert (found[:, :, 12:] - dense[:, :, 12:]).abs().amax() > 1e-3


BAD = [
    ({"group_size": 0}, "group_size"),
    ({"group_size": -4}, "group_size"),
    ({"window": 0}, "window"),
    ({"window": -1}, "window"),
    ({"keys": 20}, "key"),  # cross attention (Nq != Nk) is not supported
]


@pytest.mark.parametrize("kwargs,argument", BAD, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD)])
def test_bad_parameters_are_refused_before_computation(kwargs, argument):
    kwargs = dict(kwargs)
    q = torch.randn(1, 2, 16, 8)
    assert_refused("cca", argument, q, torch.randn(1, 2, kwargs.pop("keys", 16), 8), **kwargs)


@pytest.mark.parametrize("causal", [True, False])
def test_trains_in_low_precision(causal):
    assert_trains("cca", causal=causal, group_size=4, window=12)
