"""Sparse budgets (``Method.budget``) and the attention-weights probe (``attnzoo.arena.probe``).

The budget checks are generated from the registry: every method with a budget, causal and
non-causal where supported, at N=512, D=32, B=1, H=2 (a 1-D sequence, which spatial methods take
as a 1-D map)."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.arena import probe
from attnzoo.inputs import AttentionCall, build_call
from attnzoo.methods import cca

N, D, B, H = 512, 32, 1, 2
FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
SPARSE_FAMILIES = ("local", "block_sparse", "content_sparse")

# Sparse methods that may go without a budget, and why.
NO_BUDGET = {"block_sparse": "attends a user-given layout: the layout is the budget"}

# A mass threshold cannot fix a key count: how many blocks reach it depends on how peaked the
# attention is (on these random inputs nearly flat, on real activations far sparser), so only
# the direction is checked.
THRESHOLD_BUDGETS = {"xattention"}


def _cca_scored_density(call: AttentionCall, params: dict) -> float:
    """Raw keys plus cores each query scores, over the allowed pairs (cca's cost measure)."""
    raw, cores = cca.visibility(call, cca.CCAParams(**params))
    return float(raw.sum() + cores.sum()) / float(probe.allowed_pairs(call.q_len, call.kv_len, call.is_causal).sum())


# Methods whose attention weights cover every key whatever the budget (a pooled core spreads its
# weight over its group): their budget counts scored tokens, measured from their own definition.
SCORED_DENSITY = {"cca": _cca_scored_density}


def _budget_cases() -> list:
    cases = []
    for spec in attnzoo.methods():
        if spec.budget is None:
            continue
        for causal in (False, True):
            if spec.capabilities.causal if causal else spec.capabilities.noncausal:
                cases.append(pytest.param(spec.name, causal, id=f"{spec.name}-{'causal' if causal else 'full'}"))
    return cases


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=gen, dtype=dtype) for _ in range(3))


def _call(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> AttentionCall:
    spatial = attnzoo.get_method(name).capabilities.spatial_dims
    return build_call(q, k, v, None, 0.0, causal, None, False, None, False, False, spatial)


def test_every_sparse_method_has_a_budget():
    missing = [
        spec.name
        for family in SPARSE_FAMILIES
        for spec in attnzoo.methods(family)
        if spec.budget is None and spec.name not in NO_BUDGET
    ]
    assert not missing, f"sparse methods without a budget: {missing}"


@pytest.mark.parametrize(("name", "causal"), _budget_cases())
def test_budget_reaches_the_requested_density(name, causal):
    spec = attnzoo.get_method(name)
    q, k, v = _inputs()
    call = _call(name, q, k, v, causal)
    densities = []
    for fraction in FRACTIONS:
        params = spec.budget(call, probe.budget_keys(N, N, causal, fraction))
        weights = probe.attention_weights(name, q, k, is_causal=causal, params=params)
        support = probe.density(weights, causal)
        if name in SCORED_DENSITY:
            assert support > 0.99, f"{name}: its cores should spread weight over every key, density {support}"
            support = SCORED_DENSITY[name](call, params)
        densities.append(support)
        if name not in THRESHOLD_BUDGETS:
            assert fraction / 2 <= support <= fraction * 2, f"{name} {params}: density {support} for {fraction}"
    assert densities == sorted(densities), f"{name}: density not monotone in the fraction: {densities}"
    assert densities[0] < densities[-1], f"{name}: the budget does not change the density: {densities}"


@pytest.mark.parametrize(("name", "causal"), _budget_cases())
def test_budget_at_every_key_is_exact_attention(name, causal):
    spec = attnzoo.get_method(name)
    if spec.degenerate_params is None:
        pytest.skip(f"{name} has no degenerate limit")
    q, k, v = _inputs(seed=1)
    params = spec.budget(_call(name, q, k, v, causal), N)
    found = attnzoo.attention(q, k, v, is_causal=causal, method=name, **params)
    exact = attnzoo.attention(q, k, v, is_causal=causal, method="dense")
    torch.testing.assert_close(found, exact, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name} {params}: {m}")


@pytest.mark.parametrize(("name", "causal"), _budget_cases())
def test_budget_is_valid_for_other_shapes(name, causal):
    """Every key count, from 1 past the sequence, gives parameters the method accepts: on a 2-D map
    for spatial methods, with more keys than queries for methods with cross attention."""
    spec = attnzoo.get_method(name)
    caps = spec.capabilities
    shape = (1, 2, 6, 10, 8) if 2 in caps.spatial_dims else (1, 2, 48, 8)
    q = torch.randn(*shape)
    k = torch.randn(1, 2, 80, 8) if caps.cross else q
    call = build_call(q, k, k, None, 0.0, causal, None, False, None, False, False, caps.spatial_dims)
    for keys in (1, 2, 5, 17, call.kv_len - 1, call.kv_len, 4 * call.kv_len):
        params = spec.budget(call, keys)
        out = attnzoo.attention(q, k, k, is_causal=causal, method=name, **params)
        assert out.shape == q.shape and out.isfinite().all(), f"{name} keys={keys} {params}"


# ----------------------------------------------------------------------------- the probe
@pytest.mark.parametrize(
    ("name", "params"),
    [("dense", {}), ("sliding_window", {"window": (9, 4)}), ("moba", {"block_size": 16, "top_k": 2}), ("linear", {})],
)
@pytest.mark.parametrize("causal", [False, True])
def test_weights_times_values_is_the_output(name, params, causal):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 72, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 72, 16, generator=gen, dtype=torch.float64) for _ in range(2))  # GQA
    weights = probe.attention_weights(name, q, k, is_causal=causal, params=params)
    assert weights.shape == (2, 4, 72, 72) and weights.dtype == torch.float64
    out = attnzoo.attention(q, k, v, is_causal=causal, method=name, **params)
    torch.testing.assert_close(weights @ v.repeat_interleave(2, dim=1), out, atol=1e-12, rtol=1e-10)


def test_weights_of_a_spatial_method_are_over_flattened_positions():
    q, k, v = (torch.randn(1, 2, 6, 5, 8, dtype=torch.float64) for _ in range(3))
    weights = probe.attention_weights("neighborhood", q, k, is_causal=False, params={"kernel_size": 3})
    assert weights.shape == (1, 2, 30, 30)
    assert ((weights != 0).sum(-1) == 9).all()  # a 3x3 neighbourhood
    out = attnzoo.attention(q, k, v, method="neighborhood", kernel_size=3)
    torch.testing.assert_close(weights @ v.reshape(1, 2, 30, 8), out.reshape(1, 2, 30, 8), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(("n_q", "n_k"), [(40, 40), (24, 40)])
def test_dense_weights_are_the_causal_softmax(n_q, n_k):
    q = torch.randn(1, 2, n_q, 16, dtype=torch.float64)
    k = torch.randn(1, 2, n_k, 16, dtype=torch.float64)
    weights = probe.attention_weights("dense", q, k, is_causal=True)
    scores = (q @ k.transpose(-1, -2)) / 4.0
    allowed = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    torch.testing.assert_close(weights, expected, atol=1e-14, rtol=1e-12)


def test_mass_recall():
    q, k = (torch.randn(1, 2, 64, 16, dtype=torch.float64) for _ in range(2))
    exact = probe.attention_weights("dense", q, k, is_causal=True)
    torch.testing.assert_close(probe.mass_recall(exact, exact), torch.ones(1, 2, dtype=torch.float64))
    local = probe.attention_weights("sliding_window", q, k, is_causal=True, params={"window": (7, 0)})
    i, j = torch.arange(64)[:, None], torch.arange(64)[None, :]
    band = (j <= i) & (j >= i - 7)
    expected = (exact * band).sum(-1).mean(-1)
    torch.testing.assert_close(probe.mass_recall(local, exact), expected)
    assert (expected < 1).all()
    with pytest.raises(ValueError, match="same shape"):
        probe.mass_recall(local, exact[..., :10])


def test_density_of_a_causal_window_matches_the_count():
    q, k = (torch.randn(1, 2, 64, 16) for _ in range(2))
    weights = probe.attention_weights("sliding_window", q, k, is_causal=True, params={"window": (7, 0)})
    visited = sum(min(i + 1, 8) for i in range(64))  # 484: the first 7 queries see fewer than 8 keys
    assert probe.density(weights, True) == pytest.approx(visited / (64 * 65 / 2))
    assert probe.density(weights, False) == pytest.approx(visited / 64**2)


def test_allowed_pairs_are_bottom_right_aligned():
    allowed = probe.allowed_pairs(3, 5, True)
    assert allowed.tolist() == [[True, True, True, False, False], [True] * 4 + [False], [True] * 5]
    assert probe.allowed_pairs(3, 5, False).all()
    assert int(probe.allowed_pairs(5, 3, True).sum()) == 0 + 0 + 1 + 2 + 3  # more queries than keys


def test_budget_keys():
    assert probe.budget_keys(512, 512, True, 0.5) == 128
    assert probe.budget_keys(512, 512, False, 1 / 16) == 32
    assert probe.budget_keys(100, 400, True, 1.0) == 351  # queries see 301 .. 400 keys: 350.5 on average
    assert probe.budget_keys(512, 512, False, 1e-6) == 1
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="fraction"):
            probe.budget_keys(512, 512, False, bad)
    with pytest.raises(ValueError, match="n_q"):
        probe.budget_keys(0, 512, False, 0.5)


def test_probe_refuses_the_wrong_layout():
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        probe.attention_weights("dense", torch.randn(4, 16), torch.randn(4, 16), is_causal=False)
    with pytest.raises(ValueError, match="weights"):
        probe.density(torch.ones(3, 3), False)
