"""``pbs``: the permutation and the block selection against loops, permutation invariance of
attention, causality by original positions, the degenerate limit, statistics, bad parameters and
low-precision training."""

import math

import pytest
import torch

import attnzoo
import attnzoo.api
import attnzoo.methods.pbs
from attnzoo.api import prepare
from attnzoo.methods.pbs import chosen_blocks, gather_heads, permutation, permuted_kv_mask, select
from attnzoo.testing.helpers import assert_refused, assert_trains


def _call(n, causal, heads=(2, 2), kv_mask=None, dtype=torch.float64, dim=8, **params):
    q = torch.randn(2, heads[0], n, dim, dtype=dtype)
    k, v = (torch.randn(2, heads[1], n, dim, dtype=dtype) for _ in range(2))
    _, call, p = prepare(q, k, v, is_causal=causal, method="pbs", kv_mask=kv_mask, **params)
    return call, p


def _permutation_loop(call, p):
    B, Hq, n = call.batch, call.q_heads, call.kv_len
    perm = torch.empty(B, Hq, n, dtype=torch.long)
    for b in range(B):
        for h in range(Hq):
            kh = h // call.groups
            for s0 in range(0, n, p.segment):
                pos = list(range(s0, min(s0 + p.segment, n)))
                qbar = call.query[b, h, pos].float().mean(0)
                imp = {j: float(qbar @ call.key[b, kh, j].float()) for j in pos}
                real = [j for j in pos if call.kv_mask is None or call.kv_mask[b, j]]
                padded = [j for j in pos if j not in real]
                perm[b, h, pos] = torch.tensor(sorted(real, key=lambda j: -imp[j]) + padded)  # sorted is stable
    return perm


@pytest.mark.parametrize("heads", [(2, 2), (4, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_permutation_sorts_each_segment_by_importance(heads, padded):
    n = 45
    kv_mask = torch.tensor([[True] * 30 + [False] * 15, [False] * 7 + [True] * 38]) if padded else None
    call, p = _call(n, True, heads, kv_mask, block_size=4, segment=12, top_k=1)
    key = call.key.clone()
    key[:, :, 1::2] = key[:, :, 0:-1:2]  # equal neighbours tie: the sort must be stable
    call = call.replace(key=key)
    perm = permutation(call, p)
    assert torch.equal(perm, _permutation_loop(call, p))
    assert torch.equal(perm // p.segment, torch.arange(n).expand_as(perm) // p.segment)  # stays in its segment
    mask = permuted_kv_mask(call, perm)
    if padded:  # padded keys end their segment at the same places for every head
        real = call.kv_mask[:, None, :].expand_as(perm).gather(2, perm)
        assert torch.equal(real, mask[:, None, :].expand_as(real))


def _selection_loop(call, p, perm):
    b, n = p.block_size, call.kv_len
    n_b = math.ceil(n / b)
    k_perm = gather_heads(call.key.float(), perm, call.groups)
    real = torch.ones(call.batch, n, dtype=torch.bool) if call.kv_mask is None else call.kv_mask.gather(1, perm[:, 0])
    chosen = torch.zeros(call.batch, call.q_heads, n_b, n_b, dtype=torch.bool)
    for bi in range(call.batch):
        for h in range(call.q_heads):
            for qb in range(n_b):
                qm = call.query[bi, h, qb * b : (qb + 1) * b].float().mean(0)
                seg_q = qb * b // p.segment
                candidates = []
                for kb in range(n_b):
                    rows = [j for j in range(kb * b, min(kb * b + b, n)) if real[bi, j]]
                    if not rows:
                        continue
                    seg_k = kb * b // p.segment
                    if seg_k == seg_q:
                        chosen[bi, h, qb, kb] = True
                    elif seg_k < seg_q or not call.is_causal:
                        candidates.append((-float(qm @ k_perm[bi, h, rows].mean(0)), kb))
                for _, kb in sorted(candidates)[: p.top_k]:
                    chosen[bi, h, qb, kb] = True
    return chosen


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_block_selection_matches_a_loop(causal, padded):
    n = 70
    kv_mask = torch.tensor([[True] * 50 + [False] * 20, [False] * 12 + [True] * 58]) if padded else None
    call, p = _call(n, causal, (4, 2), kv_mask, block_size=5, segment=15, top_k=3)
    perm = permutation(call, p)
    assert torch.equal(chosen_blocks(call, p, perm), _selection_loop(call, p, perm))


def test_permuting_keys_and_values_jointly_leaves_attention_unchanged():
    call, p = _call(50, False, (4, 2), block_size=5, segment=10, top_k=1)
    perm = permutation(call, p)
    k, v = (gather_heads(x, perm, call.groups) for x in (call.key, call.value))
    q = call.query
    kk, vv = (x.repeat_interleave(call.groups, dim=1) for x in (call.key, call.value))
    torch.testing.assert_close(attnzoo.attention(q, k, v), attnzoo.attention(q, kk, vv), rtol=0, atol=1e-12)
    assert not torch.equal(perm, torch.arange(50).expand_as(perm))  # it did permute


def _original_visibility(call, layout, perm):
    seen = layout.to_dense().expand(call.batch, call.q_heads, -1, -1)  # over permuted keys
    return torch.zeros_like(seen).scatter_(-1, perm[:, :, None, :].expand_as(seen), seen)


def test_causal_mask_uses_original_positions():
    n, p_kwargs = 64, {"block_size": 4, "segment": 16, "top_k": 2}
    call, p = _call(n, True, **p_kwargs)
    perm, layout = select(call, p)
    visible = _original_visibility(call, layout, perm)
    t = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    assert not (visible & (j > t)).any()  # no future key, whatever its permuted place
    own = (j // p.segment == t // p.segment) & (j <= t)
    assert (visible | ~own).all()  # every past key of the query's own segment
    assert layout.partial().any()  # some blocks mix past and future keys: the mask_mod decides


@pytest.mark.parametrize("causal", [True, False])
def test_full_budget_is_dense_attention(causal):
    q = torch.randn(2, 4, 77, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 77, 16, dtype=torch.float64) for _ in range(2))
    kv_mask = torch.arange(77)[None] >= torch.tensor([[0], [30]])
    dense = attnzoo.attention(q, k, v, is_causal=causal, kv_mask=kv_mask)
    found = attnzoo.attention(
        q, k, v, is_causal=causal, kv_mask=kv_mask, method="pbs", block_size=4, segment=8, top_k=20
    )
    torch.testing.assert_close(found, dense, rtol=0, atol=1e-12)


def test_records_density():
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    with attnzoo.collect_stats() as found:
        attnzoo.attention(q, k, v, is_causal=True, method="pbs", block_size=16, segment=64, top_k=1)
    (entry,) = found
    assert entry["method"] == "pbs" and 0.0 < entry["density"] < 0.5 and entry["selected_blocks"] > 1


BAD = [
    ({"block_size": 0}, "block_size"),
    ({"segment": 0}, "segment"),
    ({"block_size": 16, "segment": 24}, "segment"),
    ({"block_size": 16, "segment": 8}, "segment"),
    ({"top_k": -1}, "top_k"),
    ({"keys": 20}, "key"),  # cross attention (Nq != Nk) is not supported
]


@pytest.mark.parametrize("kwargs,argument", BAD, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD)])
def test_bad_parameters_are_refused_before_computation(kwargs, argument):
    kwargs = dict(kwargs)
    q = torch.randn(1, 2, 16, 8)
    assert_refused("pbs", argument, q, torch.randn(1, 2, kwargs.pop("keys", 16), 8), **kwargs)


@pytest.mark.parametrize("causal", [True, False])
def test_trains_in_low_precision(causal):
    assert_trains("pbs", causal=causal, block_size=8, segment=32, top_k=2)
