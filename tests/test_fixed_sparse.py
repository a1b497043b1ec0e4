"""Fixed block-sparse patterns (bigbird, longformer, strided, subsampled): the keys each query sees
against brute-force loops over the papers' definitions, the seeded draws against naive loops,
layout densities, determinism, bad parameters, low precision, and the gold rule on settings the
generated suite cannot reach (several global tokens)."""

import pytest
import torch

import attnzoo
import attnzoo.api
from attnzoo.api import prepare
from attnzoo.methods import fixed_sparse, strided  # noqa: F401  (registers the four methods)
from attnzoo.methods.fixed_sparse import (
    BigBirdParams,
    bigbird_layout,
    hashed_bits,
    random_blocks,
    subsample_blocks,
)
from attnzoo.testing.cases import PATTERNS, Case, Shape
from attnzoo.testing.conformance import check_case
from attnzoo.testing.helpers import assert_refused

METHODS = ("bigbird", "longformer", "strided", "subsampled")


def visibility(method, n, heads=1, is_causal=False, **kwargs):
    """Bool ``[H, N, N]`` read off the fast path's output: with equal scores and one-hot values,
    output row i is uniform over the keys query i sees."""
    q = torch.zeros(1, heads, n, 4, dtype=torch.float64)
    v = torch.eye(n, dtype=torch.float64).expand(1, heads, n, n)
    return attnzoo.attention(q, q, v, is_causal=is_causal, method=method, **kwargs)[0] > 0


def naive_random_blocks(nb, heads, p, causal):
    """Floyd's algorithm one row at a time over the explicit candidate list."""
    half, g = (p.window - 1) // 2, p.global_blocks
    rows = []
    for h in range(heads):
        for qb in range(nb):
            if not causal and (qb < g or qb >= nb - g):
                rows.append([])
                continue
            seen = set(range(qb - half, qb + half + 1)) | set(range(g))
            seen |= set() if causal else set(range(nb - g, nb))
            cands = [kb for kb in range(nb) if kb not in seen and (not causal or kb <= qb)]
            take, chosen = min(p.random_blocks, len(cands)), []
            for s in range(take):
                j = len(cands) - take + s
                t = int(hashed_bits(p.seed, h, qb, s)) * (j + 1) >> 24
                chosen.append(j if t in chosen else t)
            rows.append(sorted(cands[t] for t in chosen))
    return rows


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "kwargs", [{}, {"window": 5, "global_blocks": 2, "random_blocks": 4, "seed": 7}, {"global_blocks": 0}]
)
def test_random_blocks_match_a_naive_loop(causal, kwargs):
    p = BigBirdParams(**kwargs)
    picks = random_blocks(13, 3, p, causal, "cpu")
    found = [sorted(x for x in row if x >= 0) for row in picks.reshape(-1, p.random_blocks).tolist()]
    assert found == naive_random_blocks(13, 3, p, causal)


def test_random_blocks_are_uniform_and_prefix_consistent():
    p = BigBirdParams(random_blocks=3)
    picks = random_blocks(20, 6000, p, False, "cpu")[:, 10]  # 6000 heads = 6000 draws for block 10
    counts = torch.bincount(picks.flatten(), minlength=20).double()
    candidates = [kb for kb in range(1, 19) if abs(kb - 10) > 1]
    assert counts[[0, 9, 10, 11, 19]].sum() == 0  # never a global or window block
    expected = 6000 * 3 / len(candidates)
    assert ((counts[candidates] - expected).abs() / expected).max() < 0.12
    causal = random_blocks(20, 4, p, True, "cpu")
    assert torch.equal(random_blocks(9, 4, p, True, "cpu"), causal[:, :9])  # independent of the length


def bigbird_loops(n, heads, p, causal):
    nb, half, g = -(-n // p.block_size), (p.window - 1) // 2, p.global_blocks
    picks = naive_random_blocks(nb, heads, p, causal)
    seen = torch.zeros(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        for i in range(n):
            for j in range(n):
                qb, kb = i // p.block_size, j // p.block_size
                ok = abs(qb - kb) <= half or qb < g or kb < g or kb in picks[h * nb + qb]
                ok = ok or (not causal and (qb >= nb - g or kb >= nb - g))
                seen[h, i, j] = ok and (j <= i or not causal)
    return seen


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_size": 4, "random_blocks": 2},
        {"block_size": 5, "window": 1, "global_blocks": 2, "random_blocks": 1, "seed": 3},
        {"block_size": 8, "global_blocks": 3},  # every block global: the global rows alone
    ],
)
def test_bigbird_sees_what_the_definition_says(causal, kwargs):
    p = BigBirdParams(**kwargs)
    expected = bigbird_loops(37, 2, p, causal)
    assert torch.equal(visibility("bigbird", 37, 2, causal, **kwargs), expected)
    q = torch.zeros(1, 2, 37, 4)
    _, call, params = prepare(q, q, q, is_causal=causal, method="bigbird", **kwargs)
    assert torch.equal(bigbird_layout(call, params).to_dense()[0], expected)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "kwargs", [{"window": 3, "block_size": 8, "global_tokens": (0, 17, 39)}, {"window": 0, "block_size": 4}]
)
def test_longformer_sees_what_the_definition_says(causal, kwargs):
    glob = set(kwargs.get("global_tokens", (0,)))
    expected = torch.tensor(
        [[(abs(i - j) <= kwargs["window"] or i in glob or j in glob) and (j <= i or not causal) for j in range(40)]
         for i in range(40)]
    )  # fmt: skip
    assert torch.equal(visibility("longformer", 40, 1, causal, **kwargs)[0], expected)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"stride": 4},
        {"stride": 7},
        {"mode": "fixed", "stride": 6, "summary": 2},
        {"mode": "fixed", "stride": 5, "summary": 5},
        {"stride": 80},
    ],
)
def test_strided_sees_what_the_definition_says(causal, kwargs):
    s, c, n = kwargs["stride"], kwargs.get("summary", 0), 45
    if kwargs.get("mode") == "fixed":
        rule = lambda i, j: j // s == i // s or j % s >= s - c  # noqa: E731
    else:
        rule = lambda i, j: abs(i - j) < s or (i - j) % s == 0  # noqa: E731
    expected = torch.tensor([[rule(i, j) and (j <= i or not causal) for j in range(n)] for i in range(n)])
    assert torch.equal(visibility("strided", n, 1, causal, **kwargs)[0], expected)


@pytest.mark.parametrize("causal", [False, True])
def test_subsampled_matches_a_naive_draw(causal):
    p = dict(keep=0.4, block_size=4, seed=11)
    q = torch.zeros(1, 3, 50, 4)
    _, call, params = prepare(q, q, q, is_causal=causal, method="subsampled", **p)
    chosen = subsample_blocks(call, params)[0]
    for h in range(3):
        for qb in range(13):
            for kb in range(13):
                kept = qb == kb or int(hashed_bits(11, h, qb, kb)) < round(0.4 * 2**24)
                assert bool(chosen[h, qb, kb]) == (kept and (kb <= qb or not causal))
    blocks = torch.arange(50) // 4
    expected = chosen[:, blocks][:, :, blocks] & (torch.ones(50, 50).tril().bool() if causal else True)
    assert torch.equal(visibility("subsampled", 50, 3, causal, **p), expected)


def test_hashed_bits_are_deterministic_and_uniform():
    i = torch.arange(100000)
    a, b = hashed_bits(0, i), hashed_bits(0, i)
    assert torch.equal(a, b) and not torch.equal(a, hashed_bits(1, i))
    assert a.min() >= 0 and a.max() < 2**24
    assert abs(a.double().mean().item() / 2**24 - 0.5) < 0.005
    assert abs((a < 0.3 * 2**24).double().mean().item() - 0.3) < 0.005


def density(method, n, causal=False, heads=2, **kwargs):
    q = torch.randn(1, heads, n, 8)
    with attnzoo.collect_stats() as found, torch.no_grad():
        attnzoo.attention(q, q, q, is_causal=causal, method=method, **kwargs)
    return found[0]["density"]


def test_layout_densities_match_the_patterns():
    # bigbird, 32 blocks of 64: global rows 32 blocks, rows 1 and 30 see 7 (window meets a global), others 8
    assert density("bigbird", 2048) == pytest.approx((2 * 32 + 2 * 7 + 28 * 8) / 32**2)
    # causal: row qb sees min(qb + 1, 3) window/global blocks and min(3, qb - 2) random ones
    assert density("bigbird", 2048, True) == pytest.approx((1 + 2 + 3 + 4 + 5 + 6 * 27) / 32**2)
    # longformer, window 128 = 2 blocks each side, global token 0: 183 main blocks + one full row
    assert density("longformer", 2048, window=128) == pytest.approx((183 * 64 * 64 + 2048) / 2048**2)
    # subsampled: own block + keep of the others
    assert density("subsampled", 4096, heads=4) == pytest.approx((1 + 0.25 * 63) / 64, abs=0.015)
    n = 8192
    i = torch.arange(n)
    for mode, exact in (("strided", torch.clamp(i + 1, max=128) + i // 128), ("fixed", i % 128 + 1 + i // 128 * 8)):
        found, pattern = density("strided", n, True, mode=mode), exact.sum().item() / n**2
        assert pattern <= found <= 2 * pattern, (mode, found, pattern)  # no dense strided part


@pytest.mark.parametrize("method", ["bigbird", "subsampled"])
def test_seeded_draws_are_deterministic_and_differ_between_seeds(method):
    q, k, v = (torch.randn(1, 4, 200, 16) for _ in range(3))
    kw = {"block_size": 8}
    same = [attnzoo.attention(q, k, v, method=method, seed=5, **kw) for _ in range(2)]
    other = attnzoo.attention(q, k, v, method=method, seed=6, **kw)
    assert torch.equal(same[0], same[1]) and not torch.allclose(same[0], other)


def test_subsampled_in_eval_is_dense_attention():
    q, k, v = (torch.randn(2, 4, 150, 16, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        found = attnzoo.attention(q, k, v, is_causal=causal, method="subsampled", training=False, block_size=16)
        exact = attnzoo.attention(q, k, v, is_causal=causal, method="dense", backend="reference")
        assert (found - exact).abs().max() < 1e-12


@pytest.mark.parametrize("pattern", ["full", "causal", "gqa_causal", "kv_mask_left_causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_longformer_with_several_global_tokens_meets_the_gold_rule(pattern, dtype):
    found = next(p for p in PATTERNS if p.name == pattern)
    shape = found.reshape(Shape(q_len=100, kv_len=100, head_dim=16, value_dim=16))
    params = (("window", 5), ("block_size", 8), ("global_tokens", (0, 37, 38, 99)))
    result = check_case(Case("longformer", "blocks", found, dtype, shape, params, return_lse=True))
    assert result.passed, result.message


BAD = [
    ("bigbird", {"window": 2}, "window"),
    ("bigbird", {"window": 0}, "window"),
    ("bigbird", {"block_size": 0}, "block_size"),
    ("bigbird", {"global_blocks": -1}, "global_blocks"),
    ("bigbird", {"random_blocks": -1}, "random_blocks"),
    ("longformer", {"window": -1}, "window"),
    ("longformer", {"global_tokens": (0, -1)}, "global_tokens"),
    ("longformer", {"global_tokens": (3, 16)}, "global_tokens"),  # N = 16
    ("longformer", {"block_size": 0}, "block_size"),
    ("strided", {"stride": 0}, "stride"),
    ("strided", {"summary": 0}, "summary"),
    ("strided", {"mode": "fixed", "stride": 4, "summary": 5}, "summary"),
    ("subsampled", {"keep": 0.0}, "keep"),
    ("subsampled", {"keep": 1.5}, "keep"),
    ("subsampled", {"block_size": 0}, "block_size"),
    ("bigbird", {"short_keys": True}, "key"),  # cross attention is refused
]


@pytest.mark.parametrize("method,kwargs,argument", BAD, ids=[f"{m}-{a}-{i}" for i, (m, _, a) in enumerate(BAD)])
def test_bad_parameters_are_refused_before_computation(method, kwargs, argument):
    kwargs = dict(kwargs)
    q = torch.randn(1, 2, 16, 8)
    assert_refused(method, argument, q, q[:, :, :8] if kwargs.pop("short_keys", False) else q, **kwargs)


def test_strided_ignores_summary_in_strided_mode():
    q = torch.randn(1, 1, 20, 8)
    attnzoo.attention(q, q, q, method="strided", stride=4)  # summary=8 > stride is fine here


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("bigbird", {"block_size": 8, "random_blocks": 2}),
        ("longformer", {"window": 9, "block_size": 8, "global_tokens": (0, 50)}),
        ("strided", {"stride": 9}),
        ("strided", {"mode": "fixed", "stride": 9, "summary": 3}),
        ("subsampled", {"block_size": 8, "keep": 0.5}),
    ],
)
def test_trains_in_bfloat16(method, kwargs):
    causal = True
    q, k, v = (torch.randn(2, 4, 100, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out, lse = attnzoo.attention(q, k, v, is_causal=causal, method=method, return_lse=True, **kwargs)
    (out.float().square().sum() + lse.float().sum()).backward()
    assert out.dtype == torch.bfloat16 and out.isfinite().all() and lse.isfinite().all()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.isfinite().all() for t in (q, k, v))
    ref = attnzoo.attention(q.double(), k.double(), v.double(), is_causal=causal, method=method, backend="reference",
                            **kwargs)  # fmt: skip
    assert (out.double() - ref).abs().max() < 0.05
