"""Decoding every causal method: generation through ``step`` equals what its semantics promise,
bounded states stay bounded, split-KV, MoBA's running block sums, state sizes and ``Cache``."""

import importlib

import pytest
import torch

import attnzoo
from attnzoo.decode import decode_semantics
from attnzoo.testing.cases import Shape, random_qkv

CAUSAL = [m for m in attnzoo.methods() if m.capabilities.causal]
DECODE = [m for m in attnzoo.methods() if m.capabilities.decode]


def _qkv(spec, n=30, batch=2, dtype=torch.float64, seed=0):
    shape = Shape(batch, 4, 2 if spec.capabilities.gqa else 4, n, n, 8, 8)
    return tuple(t.to(dtype) for t in random_qkv(shape, seed, spec=spec))


def _params(spec):
    return dict(spec.test_params[-1])  # the last set: several methods' hardest (dilation, stride, small blocks)


def test_every_causal_method_decodes():
    assert [m.name for m in CAUSAL if not m.capabilities.decode] == []


@pytest.mark.parametrize("spec", [m for m in CAUSAL if m.sample_params is None], ids=lambda m: m.name)
def test_prefill_then_token_by_token_equals_recomputation(spec):
    q, k, v = _qkv(spec)
    params = _params(spec)
    semantics = decode_semantics(spec.name, **params)
    state = attnzoo.init_state(spec.name, batch=2, kv_heads=k.shape[1], head_dim=8, dtype=torch.float64, **params)
    prefill = 11
    ends = [prefill, *range(prefill + 1, 31)]
    outs, start = [], 0
    for end in ends:
        out, state = attnzoo.step(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], state)
        if semantics == "cross":
            want = attnzoo.attention(
                q[:, :, start:end], k[:, :, :end], v[:, :, :end], is_causal=True, method=spec.name, **params
            )
            torch.testing.assert_close(out, want, atol=1e-9, rtol=0)
        elif semantics == "prefix" and end >= 8:  # every test kernel fits in 8 tokens
            want = attnzoo.attention(
                q[:, :, :end], k[:, :, :end], v[:, :, :end], is_causal=True, method=spec.name, **params
            )
            torch.testing.assert_close(out, want[:, :, start:end], atol=1e-9, rtol=0)
        outs.append(out)
        start = end
    if semantics == "full":
        full = attnzoo.attention(q, k, v, is_causal=True, method=spec.name, **params)
        torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-9, rtol=0)
    assert state.length == 30


@pytest.mark.parametrize("spec", DECODE, ids=lambda m: m.name)
def test_state_size_matches_the_measured_bytes(spec):
    params = _params(spec)
    q, k, v = _qkv(spec, n=23, dtype=torch.float32)
    state = attnzoo.init_state(spec.name, batch=2, kv_heads=k.shape[1], head_dim=8, **params)
    for lo, hi in ((0, 1), (1, 9), (9, 10), (10, 23)):
        _, state = attnzoo.step(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], state)
        size = attnzoo.state_size(spec.name, hi, kv_heads=k.shape[1], head_dim=8, query_heads=4, **params)
        assert state.size_bytes() == size * 2 * 4, (spec.name, hi)


@pytest.mark.parametrize(
    "method,params",
    [
        ("sliding_window", {"window": (7, 0), "sinks": 2, "dilation": 2}),
        ("sliding_window", {"window": (0, 3)}),
        ("blocked_local", {"block_size": 4, "halo": 2}),
        ("neighborhood", {"kernel_size": 3, "dilation": 2, "stride": 2}),
        ("longformer", {"window": 5, "global_tokens": ()}),
    ],
)
def test_local_states_stay_bounded(method, params):
    def sizes(first: int) -> list[int]:
        return [attnzoo.state_size(method, n, kv_heads=2, head_dim=8, **params) for n in range(first, first + 24)]

    bound = max(sizes(100))  # the cache is cut at block boundaries: it cycles, never grows
    assert bound == max(sizes(10**6)) and bound <= 20 * 2 * 16
    q, k, v = (torch.randn(1, 2, 90, 8, dtype=torch.float64) for _ in range(3))
    state = attnzoo.init_state(method, batch=1, kv_heads=2, head_dim=8, dtype=torch.float64, **params)
    outs = []
    for t in range(90):
        out, state = attnzoo.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        outs.append(out)
        assert state.size_bytes() <= bound * 8
    full = attnzoo.attention(q, k, v, is_causal=True, method=method, **params)
    if decode_semantics(method, **params) == "full":
        torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-12, rtol=0)
    else:  # stride groups: the last row of each prefix
        torch.testing.assert_close(outs[-1], full[:, :, -1:], atol=1e-12, rtol=0)


def test_sliding_window_ring_wraps_and_keeps_positions():
    sw = importlib.import_module("attnzoo.methods.sliding_window")
    params = {"window": (4, 0), "sinks": 1, "dilation": 1}
    q, k, v = (torch.randn(1, 1, 12, 8, dtype=torch.float64) for _ in range(3))
    state = attnzoo.init_state("sliding_window", batch=1, kv_heads=1, head_dim=8, dtype=torch.float64, **params)
    _, state = attnzoo.step(q[:, :, :11], k[:, :, :11], v[:, :, :11], state)
    inner = state.inner
    assert inner.ring_key.shape[2] == 4 and inner.sink_key.shape[2] == 1
    positions = sw.ring_positions(11, 4, state.params, "cpu")
    assert sorted(positions.tolist()) == [7, 8, 9, 10]
    torch.testing.assert_close(inner.ring_key, k[:, :, positions])
    torch.testing.assert_close(inner.sink_key, k[:, :, :1])


@pytest.mark.parametrize("n_new", [1, 3])
def test_dense_split_kv_equals_unsplit(monkeypatch, n_new):
    dense = importlib.import_module("attnzoo.methods.dense")
    q, k, v = (torch.randn(2, 6, 45, 16, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()  # GQA: 3 query heads per key/value head
    unsplit_state = attnzoo.init_state("dense", batch=2, kv_heads=2, head_dim=16, dtype=torch.float64)
    _, unsplit_state = attnzoo.step(q[:, :, :40], k[:, :, :40], v[:, :, :40], unsplit_state)
    want, _ = attnzoo.step(q[:, :, 40 : 40 + n_new], k[:, :, 40 : 40 + n_new], v[:, :, 40 : 40 + n_new], unsplit_state)
    monkeypatch.setattr(dense, "SPLIT_KV_THRESHOLD", 8)
    parts = []
    original = dense._part
    monkeypatch.setattr(dense, "_part", lambda *a: parts.append(a[1].shape[2]) or original(*a))
    found, _ = attnzoo.step(q[:, :, 40 : 40 + n_new], k[:, :, 40 : 40 + n_new], v[:, :, 40 : 40 + n_new], unsplit_state)
    assert parts == [8, 8, 8, 8, 8, n_new]  # five chunks of the 40 cached keys, then the new keys
    torch.testing.assert_close(found, want, atol=1e-12, rtol=0)
    full = attnzoo.attention(q[:, :, : 40 + n_new], k[:, :, : 40 + n_new], v[:, :, : 40 + n_new], is_causal=True)
    torch.testing.assert_close(found, full[:, :, 40:], atol=1e-12, rtol=0)


def test_moba_decode_scores_running_block_sums(monkeypatch):
    bs = importlib.import_module("attnzoo.methods.block_select")
    params = {"block_size": 4, "top_k": 2}
    q, k, v = (torch.randn(1, 2, 30, 8, dtype=torch.float64) for _ in range(3))
    state = attnzoo.init_state("moba", batch=1, kv_heads=2, head_dim=8, dtype=torch.float64, **params)
    _, state = attnzoo.step(q[:, :, :29], k[:, :, :29], v[:, :, :29], state)
    pooled = []
    original = bs.block_means
    monkeypatch.setattr(bs, "block_means", lambda x, *a: pooled.append(x.shape[2]) or original(x, *a))
    out, state = attnzoo.step(q[:, :, 29:], k[:, :, 29:], v[:, :, 29:], state)
    assert pooled == [1]  # only the new query is pooled: the keys' block means come from the sums
    sums = torch.nn.functional.pad(k, (0, 0, 0, 2)).view(1, 2, 8, 4, 8).sum(3)
    torch.testing.assert_close(state.inner.key_sums, sums, atol=1e-12, rtol=0)
    monkeypatch.setattr(bs, "block_means", original)
    want = attnzoo.attention(q[:, :, 29:], k, v, is_causal=True, method="moba", **params)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    dense = attnzoo.attention(q[:, :, 29:], k, v, is_causal=True)
    assert (out - dense).abs().max() > 1e-3  # two blocks of eight: a real selection


@pytest.mark.parametrize("spec", DECODE, ids=lambda m: m.name)
def test_steps_that_do_not_fit_the_state_are_refused(spec):
    params = _params(spec)
    q, k, v = _qkv(spec, n=9)
    state = attnzoo.init_state(spec.name, batch=2, kv_heads=k.shape[1], head_dim=8, dtype=torch.float64, **params)
    _, state = attnzoo.step(q[:, :, :8], k[:, :, :8], v[:, :, :8], state)
    bad_heads = (q[:, :, 8:].repeat(1, 2, 1, 1), k[:, :, 8:].repeat(1, 2, 1, 1), v[:, :, 8:].repeat(1, 2, 1, 1))
    with pytest.raises(ValueError, match="key"):
        attnzoo.step(*bad_heads, state)
    with pytest.raises(ValueError, match="value"):
        attnzoo.step(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:, :4], state)
    with pytest.raises(ValueError, match="key"):
        attnzoo.step(q[:, :, 8:].float(), k[:, :, 8:].float(), v[:, :, 8:].float(), state)


@pytest.mark.parametrize("method", ["pbs", "cca"])
def test_query_caches_refuse_other_query_heads(method):
    spec = attnzoo.get_method(method)
    q, k, v = _qkv(spec, n=9)
    state = attnzoo.init_state(method, batch=2, kv_heads=2, head_dim=8, dtype=torch.float64, **_params(spec))
    _, state = attnzoo.step(q[:, :, :8], k[:, :, :8], v[:, :, :8], state)
    with pytest.raises(ValueError, match="query"):
        attnzoo.step(q[:, :2, 8:], k[:, :, 8:], v[:, :, 8:], state)


def test_cache_steps_layers_in_order():
    cache = attnzoo.Cache("sliding_window", layers=3, batch=1, kv_heads=2, head_dim=8, window=(3, 0))
    x = torch.randn(3, 1, 2, 10, 8)
    outs = []
    for lo, hi in ((0, 4), (4, 5), (5, 10)):
        for layer in range(3):
            outs.append(cache.step(layer, x[layer, :, :, lo:hi], x[layer, :, :, lo:hi], x[layer, :, :, lo:hi]))
        assert cache.length == hi
    assert cache.size_bytes() == 3 * attnzoo.state_size("sliding_window", 10, kv_heads=2, head_dim=8, window=(3, 0)) * 4
    full = attnzoo.attention(x[2], x[2], x[2], is_causal=True, method="sliding_window", window=(3, 0))
    torch.testing.assert_close(torch.cat(outs[2::3], 2), full)
    t = x[0, :, :, :1]
    with pytest.raises(ValueError, match="layer"):
        cache.step(3, t, t, t)
    with pytest.raises(ValueError, match="layer"):
        cache.step(1, t, t, t)  # layer 0 has not seen the token yet
    cache.step(0, t, t, t)
    with pytest.raises(ValueError, match="length"):
        cache.length  # noqa: B018  (a property that raises mid-step)
    with pytest.raises(ValueError, match="layer"):
        cache.step(0, t, t, t)  # twice before the other layers
    with pytest.raises(ValueError, match="key"):
        cache.step(1, t, t[..., :4], t)
    cache.reset()
    assert cache.length == 0 and cache.size_bytes() == 0
    with pytest.raises(ValueError, match="layers"):
        attnzoo.Cache("dense", layers=0, batch=1, kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="method"):
        attnzoo.Cache("window", layers=1, batch=1, kv_heads=1, head_dim=8)


def test_state_size_refuses_bad_arguments():
    assert attnzoo.state_size("dense", 10, kv_heads=2, head_dim=8, value_dim=4) == 10 * 2 * 12
    with pytest.raises(ValueError, match="seq_len"):
        attnzoo.state_size("dense", -1, kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="query_heads"):
        attnzoo.state_size("pbs", 10, kv_heads=2, head_dim=8, query_heads=3)
    with pytest.raises(ValueError, match="method"):
        attnzoo.state_size("window", 10, kv_heads=2, head_dim=8)
