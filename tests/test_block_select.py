"""moba and xattention: the selection against naive per-block loops, budgets, statistics, the
layout actually run, planted patterns, padding, bad parameters and low-precision training."""

import math

import pytest
import torch

import attnzoo
import attnzoo.api
import attnzoo.methods.block_select
from attnzoo.api import prepare
from attnzoo.methods import block_select
from attnzoo.testing.helpers import assert_refused, assert_trains

SETTINGS = [  # (Nq, Nk, causal, padded)
    (50, 50, True, False),
    (50, 50, False, True),
    (45, 45, True, True),
    (30, 53, True, False),
    (30, 53, False, False),
    (50, 21, True, True),
    (50, 21, False, False),
]


def make(nq, nk, causal, padded, seed=0, method="moba", **params):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, nq, 16, generator=gen)
    k = torch.randn(2, 2, nk, 16, generator=gen)
    v = torch.randn(2, 2, nk, 16, generator=gen)
    kv_mask = None
    if padded:  # right padding on batch 0, left padding (two empty blocks at bs=8) on batch 1
        pos = torch.arange(nk)
        kv_mask = torch.stack([pos < nk - 13, pos >= 17])
    _, call, p = prepare(q, k, v, is_causal=causal, kv_mask=kv_mask, method=method, **params)
    return call, p


# ----------------------------------------------------------------------------- naive definitions
def block_rows(n, bs):
    return [list(range(i, min(n, i + bs))) for i in range(0, n, bs)]


def structure(call, bs, b):
    """Per query block: (candidate key blocks, forced key blocks), from positions, by loops."""
    off, nk = call.causal_offset, call.kv_len
    real = [True] * nk if call.kv_mask is None else call.kv_mask[b].tolist()
    kblocks = block_rows(nk, bs)
    out = []
    for qs in block_rows(call.q_len, bs):
        cand, forced = set(), set()
        for kb, ks in enumerate(kblocks):
            if not any(real[j] for j in ks):
                continue
            if call.is_causal:
                seen = [j <= i + off for i in qs for j in ks]
                if all(seen):
                    cand.add(kb)
                elif any(seen):
                    forced.add(kb)
            else:
                cand.add(kb)
                lo = min(max(qs[0] + off, 0), nk - 1)
                hi = min(max(qs[-1] + off, 0), nk - 1)
                if any(lo <= j <= hi for j in ks):
                    forced.add(kb)
        out.append((cand, forced))
    return out


def naive_moba(call, p):
    bs, g = p.block_size, call.groups
    q, k = call.query.double(), call.key.double()
    chosen = torch.zeros(call.batch, call.q_heads, -(-call.q_len // bs), -(-call.kv_len // bs), dtype=torch.bool)
    for b in range(call.batch):
        real = [True] * call.kv_len if call.kv_mask is None else call.kv_mask[b].tolist()
        for h in range(call.q_heads):
            for qb, (qs, (cand, forced)) in enumerate(zip(block_rows(call.q_len, bs), structure(call, bs, b))):
                qm = q[b, h, qs].mean(0)
                scores = {}
                for kb in cand - forced:
                    ks = [j for j in range(kb * bs, min(call.kv_len, kb * bs + bs)) if real[j]]
                    scores[kb] = float(qm @ k[b, h // g, ks].mean(0))
                ranked = sorted(scores, key=lambda kb: (-scores[kb], kb))
                for kb in list(forced) + ranked[: max(0, p.top_k - len(forced))]:
                    chosen[b, h, qb, kb] = True
    return chosen


def naive_xattention(call, p):
    bs, s, g = p.block_size, p.stride, call.groups
    q, k = call.query.double(), call.key.double()
    nq, nk = -(-call.q_len // bs), -(-call.kv_len // bs)
    chosen = torch.zeros(call.batch, call.q_heads, nq, nk, dtype=torch.bool)
    for b in range(call.batch):
        real = [True] * call.kv_len if call.kv_mask is None else call.kv_mask[b].tolist()
        for h in range(call.q_heads):
            for qb, (cand, forced) in enumerate(structure(call, bs, b)):
                if 0 in cand | forced:
                    forced = forced | {0}
                if p.threshold >= 1.0:
                    chosen[b, h, qb, list(cand | forced)] = True
                    continue
                cols = [c for c in range(nk * bs // s) if c * s // bs in cand]
                cols = [c for c in cols if any(c * s + i < call.kv_len and real[c * s + i] for i in range(s))]
                mass = dict.fromkeys(cand, 0.0)
                for r in range(qb * bs // s, (qb + 1) * bs // s):
                    if r * s >= call.q_len or not cols:
                        continue
                    row = []
                    for c in cols:
                        total = 0.0
                        for i in range(s):
                            qi, kj = r * s + s - 1 - i, c * s + i
                            if qi < call.q_len and kj < call.kv_len and real[kj]:
                                total += float(q[b, h, qi] @ k[b, h // g, kj])
                        row.append(total * call.scale / s)
                    probs = torch.softmax(torch.tensor(row, dtype=torch.float64), 0).tolist()
                    for c, pr in zip(cols, probs):
                        mass[c * s // bs] += pr
                target = p.threshold * sum(mass.values())
                kept = sum(mass[kb] for kb in forced if kb in cand)
                keep = set(forced)
                for kb in sorted(cand - forced, key=lambda kb: (-mass[kb], kb)):
                    if kept >= target:
                        break
                    keep.add(kb)
                    kept += mass[kb]
                chosen[b, h, qb, list(keep)] = True
    return chosen


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("top_k", [1, 3])
def test_moba_selection_matches_naive_loops(setting, top_k):
    call, p = make(*setting, block_size=8, top_k=top_k)
    assert torch.equal(block_select.moba_blocks(call, p), naive_moba(call, p))


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("stride,threshold", [(4, 0.6), (2, 0.9), (8, 0.3), (4, 1.0)])
def test_xattention_selection_matches_naive_loops(setting, stride, threshold):
    call, p = make(*setting, method="xattention", block_size=8, stride=stride, threshold=threshold)
    assert torch.equal(block_select.xattention_blocks(call, p), naive_xattention(call, p))


def test_padding_blocks_are_never_selected_and_pooled_means_ignore_padding():
    call, p = make(40, 40, False, True, block_size=8, top_k=5)
    chosen = block_select.moba_blocks(call, p)
    assert not chosen[1, :, :, :2].any()  # batch 1: keys 0..16 are padding, blocks 0 and 1 empty
    # padded keys do not move the pooled means: changing them changes nothing
    k2 = call.key.clone()
    k2[1, :, :17] = 100.0
    assert torch.equal(block_select.moba_blocks(call.replace(key=k2), p), chosen)
    call, p = make(40, 40, True, True, method="xattention", block_size=8, stride=4, threshold=0.99)
    assert not block_select.xattention_blocks(call, p)[1, :, :, :2].any()


@pytest.mark.parametrize("causal", [True, False])
def test_budget_monotonicity(causal):
    call, _ = make(80, 80, causal, False, seed=3, block_size=8)
    prev = None
    for top_k in range(1, 12):
        chosen = block_select.moba_blocks(call, block_select.MobaParams(block_size=8, top_k=top_k))
        assert prev is None or bool((prev <= chosen).all())
        prev = chosen
    assert prev.sum() == (block_select.moba_blocks(call, block_select.MobaParams(block_size=8, top_k=99))).sum()
    prev = None
    for tau in (0.05, 0.2, 0.4, 0.6, 0.8, 0.9, 0.99, 1.0):
        chosen = block_select.xattention_blocks(call, block_select.XAttentionParams(8, 4, tau))
        assert prev is None or bool((prev <= chosen).all())
        prev = chosen


def test_causal_selection_is_diagonal_forced_and_never_future():
    call, p = make(64, 64, True, False, block_size=8, top_k=2)
    for chosen in (block_select.moba_blocks(call, p), block_select.xattention_blocks(call, _xp(0.5))):
        eye = torch.eye(8, dtype=torch.bool)
        assert chosen[..., eye].all() and not chosen[..., torch.ones(8, 8).triu(1).bool()].any()
    assert block_select.xattention_blocks(call, _xp(0.5))[..., 0].all()  # the first block is always kept


def _xp(tau, bs=8, stride=4):
    return block_select.XAttentionParams(block_size=bs, stride=stride, threshold=tau)


@pytest.mark.parametrize("method,params", [("moba", {"top_k": 2}), ("xattention", {"stride": 4, "threshold": 0.6})])
def test_density_is_reported_and_select_is_the_layout_run(method, params, monkeypatch):
    call, p = make(96, 96, True, True, method=method, block_size=16, **params)
    ran = []
    real_run = block_select.run_layout
    monkeypatch.setattr(block_select, "run_layout", lambda c, layout: ran.append(layout) or real_run(c, layout))
    kwargs = {"is_causal": True, "kv_mask": call.kv_mask, "method": method, "block_size": 16, **params}
    with attnzoo.collect_stats() as found:
        attnzoo.attention(call.query, call.key, call.value, **kwargs)
    layout = block_select.select(call, p)
    assert len(ran) == 1 and torch.equal(ran[0].to_dense(), layout.to_dense())
    assert ran[0].groups == (2, 4)  # per batch element and query head
    (stat,) = found
    assert stat["method"] == method and stat["density"] == pytest.approx(layout.density())
    assert 0 < stat["density"] < 0.55  # below causal-dense (about 0.5 + half a block row)
    assert stat["selected_blocks"] == pytest.approx(float(layout.kv_num_blocks.float().mean()))
    # the reference reports the same selection
    with attnzoo.collect_stats() as again:
        attnzoo.attention(call.query, call.key, call.value, backend="reference", **kwargs)
    assert again[0]["density"] == pytest.approx(stat["density"])


def test_degenerate_budgets_report_full_density():
    call, _ = make(64, 64, False, False)
    for method, params in (("moba", {"top_k": 8}), ("xattention", {"threshold": 1.0, "stride": 4})):
        with attnzoo.collect_stats() as found:
            attnzoo.attention(call.query, call.key, call.value, method=method, block_size=8, **params)
        assert found[0]["density"] == 1.0 and found[0]["selected_blocks"] == 8


@pytest.mark.parametrize("causal", [True, False])
def test_planted_block_is_selected(causal):
    call, _ = make(128, 128, causal, False, seed=5)
    u = torch.randn(16)
    u = u / u.norm() * 4.0
    q, k = call.query.clone(), call.key.clone()
    q[:, :, 96:112] = u  # query block 6 of every head ...
    k[:, :, 32:48] = u  # ... aligned with key block 2
    call = call.replace(query=q, key=k)
    moba = block_select.moba_blocks(call, block_select.MobaParams(block_size=16, top_k=2))
    xatt = block_select.xattention_blocks(call, _xp(0.5, 16, 4))
    for chosen in (moba, xatt):
        assert chosen[:, :, 6, 2].all()
    assert moba[:, :, 6].sum(-1).eq(2).all()  # the planted block and the diagonal only


BAD = [
    ("moba", {"top_k": 0}, "top_k"),
    ("moba", {"top_k": -3}, "top_k"),
    ("moba", {"block_size": 0}, "block_size"),
    ("xattention", {"stride": 3}, "stride"),  # does not divide 128
    ("xattention", {"block_size": 16, "stride": 32}, "stride"),
    ("xattention", {"stride": 0}, "stride"),
    ("xattention", {"threshold": 0.0}, "threshold"),
    ("xattention", {"threshold": 1.5}, "threshold"),
    ("xattention", {"threshold": -0.1}, "threshold"),
    ("xattention", {"threshold": math.nan}, "threshold"),
    ("xattention", {"block_size": -8}, "block_size"),
]


@pytest.mark.parametrize("method,kwargs,argument", BAD, ids=[f"{m}-{a}-{i}" for i, (m, _, a) in enumerate(BAD)])
def test_bad_parameters_are_refused_before_computation(method, kwargs, argument):
    assert_refused(method, argument, torch.randn(1, 2, 40, 8), **kwargs)


@pytest.mark.parametrize("method,kwargs", [("moba", {"top_k": 2}), ("xattention", {"stride": 4, "threshold": 0.8})])
def test_trains_in_low_precision(method, kwargs):
    assert_trains(method, n=70, block_size=16, **kwargs)


def test_registered_metadata():
    for name in ("moba", "xattention"):
        spec = attnzoo.get_method(name)
        assert spec.family == "content_sparse" and not spec.exact
        assert spec.query_block(spec.params()) == 128
        assert spec.capabilities.gqa and spec.capabilities.kv_mask and spec.capabilities.lse
