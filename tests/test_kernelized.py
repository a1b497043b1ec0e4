"""performer, cosformer and kernel_rpe: semantics against plain float64 loops written from the papers'
definitions, the random projection, stability and causality under large magnitudes, states and
decoding, the FFT path's accuracy and gradients, bad parameters and low-precision training."""

import itertools
import math

import pytest
import torch

import attnzoo
from attnzoo.kernels.linear_state import LinearState
from attnzoo.methods import performer
from attnzoo.testing.helpers import assert_refused, assert_trains

F64 = torch.float64


def make(nq, nk, hq=4, hk=2, d=8, seed=0, dtype=F64, mag=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = mag * torch.randn(2, hq, nq, d, generator=gen, dtype=F64)
    k = mag * torch.randn(2, hk, nk, d, generator=gen, dtype=F64)
    v = torch.randn(2, hk, nk, d, generator=gen, dtype=F64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding(nk):
    mask = torch.ones(2, nk, dtype=torch.bool)
    mask[0, : nk // 2] = False  # left padding
    mask[1, -3:] = False  # right padding
    return mask


def naive(q, k, v, weight, causal, kv_mask=None, normalize=True):
    """``o_i = sum_j w(b, h, i, j) v_j (/ sum_j w)`` over the visible real keys, one key at a time;
    query ``i`` sits at position ``i + Nk - Nq``."""
    B, Hq, Nq, _ = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=F64)
    for b in range(B):
        for h in range(Hq):
            for i in range(Nq):
                num, den = torch.zeros(v.shape[-1], dtype=F64), 0.0
                for j in range(Nk):
                    if (causal and j > i + Nk - Nq) or (kv_mask is not None and not kv_mask[b, j]):
                        continue
                    w = weight(b, h, i, j)
                    num += w * v[b, h // (Hq // Hk), j].double()
                    den += w
                out[b, h, i] = num if not normalize else (num / den if den != 0 else 0.0)
    return out


def favor_features(x, W):
    """The paper's phi(x) = exp(Wx - |x|^2 / 2) / sqrt(m), no stabilisation."""
    return torch.exp(x @ W.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(W.shape[0])


def favor_weight(q, k, W, scale):
    root = math.sqrt(abs(scale))
    fq, fk = favor_features(q * math.copysign(root, scale), W), favor_features(k * root, W)
    g = q.shape[1] // k.shape[1]
    return lambda b, h, i, j: float(fq[b, h, i] @ fk[b, h // g, j])


# ============================================================================= performer
PERFORMER_SETTINGS = [  # (Nq, Nk, causal, padded, normalize, scale)
    (12, 12, True, False, True, None),
    (12, 12, False, True, True, None),
    (7, 13, True, True, True, 0.3),
    (13, 7, True, False, True, None),
    (9, 14, False, False, True, -0.2),
    (11, 11, True, True, False, None),
    (6, 10, False, False, False, None),
]


@pytest.mark.parametrize("setting", PERFORMER_SETTINGS, ids=str)
def test_performer_matches_naive_loops(setting):
    nq, nk, causal, padded, normalize, scale = setting
    q, k, v = make(nq, nk, mag=0.7)
    mask = padding(nk) if padded else None
    W = performer.orthogonal_projection(24, 8, torch.Generator().manual_seed(5), F64)
    expected = naive(q, k, v, favor_weight(q, k, W, 8**-0.5 if scale is None else scale), causal, mask, normalize)
    for backend in ("reference", "chunk", "parallel"):
        for params in ({"num_features": 24, "seed": 5}, {"projection": W}):
            out = attnzoo.attention(
                q, k, v, is_causal=causal, scale=scale, kv_mask=mask, method="performer", backend=backend,
                normalize=normalize, chunk_size=4, **params,
            )  # fmt: skip
            torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_orthogonal_projection_blocks_norms_seed_and_cache():
    W = performer.orthogonal_projection(1600, 16, torch.Generator().manual_seed(0), F64)
    for block in (W[:16], W[16:32], W[1584:]):
        gram = block @ block.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=0, atol=1e-10)
    squares = W.square().sum(1)  # chi^2 with 16 degrees of freedom: mean 16, variance 32
    assert abs(squares.mean().item() - 16) < 0.6 and abs(squares.var().item() - 32) < 6
    again = performer.orthogonal_projection(1600, 16, torch.Generator().manual_seed(0), F64)
    assert torch.equal(W, again)
    assert performer.orthogonal_projection(20, 16, torch.Generator().manual_seed(0), F64).shape == (20, 16)
    a = performer.cached_projection(64, 8, 3, torch.float32, torch.device("cpu"))
    assert a is performer.cached_projection(64, 8, 3, torch.float32, torch.device("cpu"))
    expected = performer.orthogonal_projection(64, 8, torch.Generator().manual_seed(3), torch.float32)
    assert torch.equal(a, expected)


def mean_error(q, k, v, causal, features, method="performer"):
    exact = attnzoo.attention(q, k, v, is_causal=causal)
    total = 0.0
    for s in range(4):
        out = attnzoo.attention(q, k, v, is_causal=causal, method=method, num_features=features, seed=s)
        total += (out - exact).abs().mean().item()
    return total / 4


@pytest.mark.parametrize("causal", [False, True])
def test_performer_error_falls_as_features_grow(causal):
    q, k, v = make(64, 64, hq=2, d=16, mag=0.5)
    errors = [mean_error(q, k, v, causal, m) for m in (16, 64, 256, 1024)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.35 * errors[0], errors  # ~ 1/sqrt(m): measured 0.2
    q, k, v = make(64, 64, hq=2, d=16)  # unit inputs: a noisier estimator, the same trend
    assert mean_error(q, k, v, causal, 1024) < 0.75 * mean_error(q, k, v, causal, 16)


@pytest.mark.parametrize("method", ["performer", "kernel_rpe"])
@pytest.mark.parametrize("causal", [False, True])
def test_random_features_are_stable_for_large_magnitudes_and_wide_heads(causal, method):
    q, k, v = make(24, 24, d=128, seed=1)
    gold = attnzoo.attention(q, k, v, is_causal=causal, method=method)
    low = attnzoo.attention(q.float(), k.float(), v.float(), is_causal=causal, method=method)
    # a data-independent key shift max|w|^2/2 leaves products near 1e-42 at D = 128 (float32 underflow)
    assert (low.double() - gold).abs().max() < 1e-4
    q, k, v = make(24, 24, d=16, seed=1)
    for qm, km in ((1.0, 30.0), (30.0, 1.0), (1.0, 100.0), (100.0, 1.0), (10.0, 10.0)):
        gold = attnzoo.attention(qm * q, km * k, v, is_causal=causal, method=method)
        for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, None)):
            out = attnzoo.attention(
                (qm * q).to(dtype), (km * k).to(dtype), v.to(dtype), is_causal=causal, method=method
            )
            assert out.isfinite().all(), (qm, km, dtype)
            assert out.abs().max() <= v.abs().max() + 0.1  # a convex combination of values
            if tol is not None:
                assert (out.double() - gold).abs().max() < tol, (qm, km)


def test_performer_future_keys_never_touch_past_rows():
    q, k, v = make(48, 48, dtype=torch.float32)
    before = attnzoo.attention(q, k, v, is_causal=True, method="performer", chunk_size=16)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] = k2[:, :, 20:] * 1e3 + 50.0  # raise the running maximum by a lot
    v2[:, :, 20:] *= 1e6
    for backend in ("chunk", "parallel", "reference"):
        after = attnzoo.attention(q, k2, v2, is_causal=True, method="performer", backend=backend, chunk_size=16)
        torch.testing.assert_close(after[:, :, :20], before[:, :, :20], rtol=0, atol=2e-6)
        assert after.isfinite().all()


def test_performer_state_continues_causal_and_noncausal_calls():
    q, k, v = make(30, 30)
    k[:, :, 20:] *= 3.0  # the running maximum grows in the second part
    full = attnzoo.attention(q, k, v, is_causal=True, method="performer", num_features=32)
    first, state = attnzoo.attention(
        q[:, :, :12], k[:, :, :12], v[:, :, :12], is_causal=True, method="performer", num_features=32,
        return_state=True,
    )  # fmt: skip
    assert isinstance(state, performer.PerformerState) and state.length == 12 and state.log_scale.shape == (2, 2)
    second = attnzoo.attention(
        q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], is_causal=True, method="performer", num_features=32,
        initial_state=state,
    )  # fmt: skip
    torch.testing.assert_close(torch.cat([first, second], 2), full, rtol=1e-12, atol=1e-12)
    # non-causal queries over the state and new keys = non-causal attention over all keys
    expected = attnzoo.attention(q[:, :, :5], k, v, method="performer", num_features=32)
    got = attnzoo.attention(
        q[:, :, :5], k[:, :, 12:], v[:, :, 12:], method="performer", num_features=32, initial_state=state
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_performer_refuses_bad_parameters():
    q = torch.randn(1, 2, 8, 8)
    plain = LinearState(torch.zeros(1, 2, 16, 8), torch.zeros(1, 2, 16), 3)
    good = performer.PerformerState(plain.state, plain.normalizer, 3, torch.zeros(1, 2))
    unscaled = performer.PerformerState(plain.state, plain.normalizer, 3)
    for argument, kwargs in [
        ("num_features", {"num_features": 0}),
        ("seed", {"seed": -1}),
        ("chunk_size", {"chunk_size": 0}),
        ("projection", {"projection": torch.randn(16, 4)}),
        ("projection", {"projection": torch.randn(16)}),
        ("projection", {"projection": torch.ones(16, 8, dtype=torch.long)}),
        ("projection", {"projection": torch.full((16, 8), math.nan)}),
        ("initial_state", {"num_features": 16, "initial_state": good, "normalize": False}),
        ("initial_state", {"num_features": 32, "initial_state": good}),
        ("initial_state", {"num_features": 16, "initial_state": unscaled}),
    ]:  # fmt: skip
        assert_refused("performer", argument, q, **kwargs)
    with pytest.raises(TypeError, match="initial_state"):
        attnzoo.attention(q, q, q, method="performer", num_features=16, initial_state=plain)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_trains_in_bfloat16(causal):
    assert_trains("performer", causal=causal, num_features=64)


# ============================================================================= cosformer
def cos_weight(q, k, m, start=0):
    g = q.shape[1] // k.shape[1]
    nq, nk = q.shape[2], k.shape[2]
    rq, rk = q.double().relu(), k.double().relu()

    def weight(b, h, i, j):
        pi, pj = start + i + nk - nq, start + j
        return float(rq[b, h, i] @ rk[b, h // g, j]) * math.cos(math.pi * (pi - pj) / (2 * m))

    return weight


COS_SETTINGS = [  # (Nq, Nk, causal, padded, max_len)
    (12, 12, True, False, 12),
    (12, 12, True, True, 40),
    (12, 12, False, True, None),
    (7, 13, True, False, 20),
    (13, 7, True, True, 13),
    (9, 14, False, False, None),
    (14, 9, False, False, None),
    (14, 9, False, False, 30),
]


@pytest.mark.parametrize("setting", COS_SETTINGS, ids=str)
def test_cosformer_matches_naive_loops(setting):
    nq, nk, causal, padded, max_len = setting
    q, k, v = make(nq, nk)
    mask = padding(nk) if padded else None
    expected = naive(q, k, v, cos_weight(q, k, max_len or max(nq, nk)), causal, mask)
    for backend in ("reference", "chunk", "parallel"):
        out = attnzoo.attention(
            q, k, v, is_causal=causal, kv_mask=mask, method="cosformer", backend=backend, max_len=max_len,
            chunk_size=5,
        )  # fmt: skip
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_cosformer_state_keeps_absolute_positions():
    q, k, v = make(20, 20)
    first, state = attnzoo.attention(
        q[:, :, :8], k[:, :, :8], v[:, :, :8], is_causal=True, method="cosformer", max_len=25, return_state=True
    )
    second = attnzoo.attention(
        q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], is_causal=True, method="cosformer", max_len=25, initial_state=state
    )
    full = naive(q, k, v, cos_weight(q, k, 25), True)
    torch.testing.assert_close(torch.cat([first, second], 2), full, rtol=1e-10, atol=1e-10)
    # non-causal continuation: the new queries sit after the state's keys
    got = attnzoo.attention(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], method="cosformer", max_len=25, initial_state=state)
    expected = naive(q[:, :, 8:], k, v, cos_weight(q[:, :, 8:], k, 25), False)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_cosformer_tends_to_relu_linear_attention_for_large_max_len():
    q, k, v = make(16, 16)
    for causal in (False, True):
        cos = attnzoo.attention(q, k, v, is_causal=causal, method="cosformer", max_len=10**9)
        lin = attnzoo.attention(q, k, v, is_causal=causal, method="linear", feature_map="relu")
        torch.testing.assert_close(cos, lin, rtol=1e-9, atol=1e-9)
        short = attnzoo.attention(q, k, v, is_causal=causal, method="cosformer", max_len=16)
        assert (short - lin).abs().max() > 1e-3  # the re-weighting matters


def test_cosformer_refuses_missing_or_short_max_len():
    q = torch.randn(1, 2, 8, 8)
    assert_refused("cosformer", "max_len", q, is_causal=True)
    assert_refused("cosformer", "max_len", q, is_causal=True, max_len=7)
    assert_refused("cosformer", "max_len", q, max_len=0)
    assert_refused("cosformer", "max_len", q, torch.randn(1, 2, 4, 8), max_len=6)  # Nq = 8 > M non-causal
    assert_refused("cosformer", "max_len", q, torch.randn(1, 2, 12, 8), max_len=10)
    _, state = attnzoo.attention(q, q, q, is_causal=True, method="cosformer", max_len=12, return_state=True)
    assert_refused("cosformer", "max_len", q, initial_state=state)  # a state needs a fixed M
    assert_refused("cosformer", "max_len", q, is_causal=True, max_len=12, initial_state=state)  # 8 + 8 > 12
    with pytest.raises(ValueError, match="max_len"):
        attnzoo.init_state("cosformer", batch=1, kv_heads=2, head_dim=8)
    dec = attnzoo.init_state("cosformer", batch=1, kv_heads=2, head_dim=8, max_len=9)
    _, dec = attnzoo.step(q, q, q, dec)
    with pytest.raises(ValueError, match="max_len"):
        attnzoo.step(q[:, :, :2], q[:, :, :2], q[:, :, :2], dec)


@pytest.mark.parametrize("causal", [False, True])
def test_cosformer_trains_in_bfloat16(causal):
    assert_trains("cosformer", causal=causal, max_len=128)


# ============================================================================= kernel_rpe
def rpe_weight(q, k, rpe, feature_map, scale, W=None):
    g = q.shape[1] // k.shape[1]
    nq, nk = q.shape[2], k.shape[2]
    if feature_map == "performer":
        root = math.sqrt(abs(scale))
        fq, fk = favor_features(q * math.copysign(root, scale), W), favor_features(k * root, W)
    elif feature_map == "elu":
        fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    else:
        fq, fk = q.relu(), k.relu()
    L = 0 if rpe is None else (rpe.shape[1] + 1) // 2

    def weight(b, h, i, j):
        bias = 0.0 if rpe is None else float(rpe[h if rpe.shape[0] > 1 else 0, L - 1 + (i + nk - nq) - j])
        return float(fq[b, h, i] @ fk[b, h // g, j]) * math.exp(bias)

    return weight


RPE_SETTINGS = [  # (Nq, Nk, causal, padded, rpe heads (0: None), extra L)
    (12, 12, True, False, 4, 0),
    (12, 12, False, True, 1, 3),
    (7, 13, True, True, 4, 0),
    (13, 7, True, False, 1, 0),
    (9, 14, False, False, 4, 2),
    (14, 9, False, True, 4, 0),
    (11, 11, True, True, 0, 0),
]


@pytest.mark.parametrize("feature_map", ["performer", "elu", "relu"])
@pytest.mark.parametrize("setting", RPE_SETTINGS, ids=str)
def test_kernel_rpe_matches_naive_loops(setting, feature_map):
    nq, nk, causal, padded, heads, extra = setting
    q, k, v = make(nq, nk, mag=0.7)
    mask = padding(nk) if padded else None
    L = max(nq, nk) + extra
    rpe = torch.randn(heads, 2 * L - 1, generator=torch.Generator().manual_seed(1), dtype=F64) if heads else None
    W = performer.orthogonal_projection(16, 8, torch.Generator().manual_seed(2), F64)
    expected = naive(q, k, v, rpe_weight(q, k, rpe, feature_map, 8**-0.5, W), causal, mask)
    for backend in ("reference", "fft"):
        for block in (1, 2, 64):
            out = attnzoo.attention(
                q, k, v, is_causal=causal, kv_mask=mask, method="kernel_rpe", backend=backend, rpe=rpe,
                feature_map=feature_map, num_features=16, seed=2, block_size=block,
            )  # fmt: skip
            torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_kernel_rpe_without_bias_is_linear_attention_with_the_same_features():
    q, k, v = make(10, 15)
    for causal in (False, True):
        lin = attnzoo.attention(q, k, v, is_causal=causal, method="linear", feature_map="elu")
        perf = attnzoo.attention(q, k, v, is_causal=causal, method="performer", num_features=32, seed=4)
        for backend in ("reference", "fft"):
            kw = {"is_causal": causal, "method": "kernel_rpe", "backend": backend}
            torch.testing.assert_close(attnzoo.attention(q, k, v, feature_map="elu", **kw), lin, rtol=1e-12, atol=1e-12)
            got = attnzoo.attention(q, k, v, num_features=32, seed=4, **kw)
            torch.testing.assert_close(got, perf, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("feature_map", ["performer", "elu"])
def test_kernel_rpe_fft_is_as_accurate_as_the_dense_reference_in_float32(feature_map):
    # one full-length causal FFT is off by ~1e-3 here, and by O(1e3) on left-padded rows
    q, k, v = make(600, 600, hq=2, d=16, dtype=torch.float32)
    mask = torch.ones(2, 600, dtype=torch.bool)
    mask[1, :450] = False
    rpe = 0.5 * torch.randn(2, 1199, generator=torch.Generator().manual_seed(3))
    for causal in (True, False):
        kw = {"is_causal": causal, "kv_mask": mask, "method": "kernel_rpe", "rpe": rpe, "feature_map": feature_map}
        gold = attnzoo.attention(q.double(), k.double(), v.double(), backend="reference", **{**kw, "rpe": rpe.double()})
        ref = (attnzoo.attention(q, k, v, backend="reference", **kw).double() - gold).abs().max().item()
        fft = (attnzoo.attention(q, k, v, backend="fft", **kw).double() - gold).abs().max().item()
        assert fft <= max(3 * ref, 1e-6), (causal, fft, ref)


def test_kernel_rpe_fft_is_strictly_causal():
    q, k, v = make(70, 70, dtype=torch.float32)
    rpe = torch.randn(4, 139)
    run = lambda k, v: attnzoo.attention(  # noqa: E731
        q, k, v, is_causal=True, method="kernel_rpe", backend="fft", rpe=rpe, feature_map="elu", block_size=4
    )
    before = run(k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 33:] *= 1e4
    v2[:, :, 33:] *= 1e6
    after = run(k2, v2)
    assert torch.equal(after[:, :, :33], before[:, :, :33])  # not even rounding reaches the past


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_rpe_fft_gradients(causal):
    gen = torch.Generator().manual_seed(0)
    q = (0.7 * torch.randn(1, 2, 9, 4, generator=gen, dtype=F64)).requires_grad_()
    k, v = ((0.7 * torch.randn(1, 1, 11, 4, generator=gen, dtype=F64)).requires_grad_() for _ in range(2))
    rpe = (0.3 * torch.randn(2, 21, generator=gen, dtype=F64)).requires_grad_()
    fn = lambda q, k, v, rpe: attnzoo.attention(  # noqa: E731
        q, k, v, is_causal=causal, method="kernel_rpe", backend="fft", rpe=rpe, num_features=6, block_size=2
    )  # causal: 11 keys in blocks of 2, FFT levels of 2, 4 and 8
    assert torch.autograd.gradcheck(fn, (q, k, v, rpe), eps=1e-6, atol=1e-6, fast_mode=True)


def test_kernel_rpe_decode_cache_grows_and_needs_a_long_enough_bias():
    q, k, v = make(12, 12)
    rpe = 0.3 * torch.randn(4, 23, dtype=F64)
    full = attnzoo.attention(q, k, v, is_causal=True, method="kernel_rpe", rpe=rpe)
    state = attnzoo.init_state("kernel_rpe", batch=2, kv_heads=2, head_dim=8, dtype=F64, rpe=rpe)
    outs, sizes = [], []
    for a, b in ((0, 1), (1, 5), (5, 12)):
        out, state = attnzoo.step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state)
        outs.append(out)
        sizes.append(state.size_bytes())
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-12, atol=1e-12)
    per_token = 2 * 2 * (64 + 1 + 8) * 8  # B * Hkv * (F + 1 + Dv) float64 numbers
    assert sizes == [per_token, 5 * per_token, 12 * per_token]
    short = attnzoo.init_state("kernel_rpe", batch=2, kv_heads=2, head_dim=8, dtype=F64, rpe=rpe[:, 5:-5])
    _, short = attnzoo.step(q[:, :, :6], k[:, :, :6], v[:, :, :6], short)
    with pytest.raises(ValueError, match="rpe"):
        attnzoo.step(q[:, :, 6:8], k[:, :, 6:8], v[:, :, 6:8], short)


def test_kernel_rpe_refuses_bad_parameters():
    q = torch.randn(1, 4, 8, 8)
    k = torch.randn(1, 2, 8, 8)
    for argument, kwargs in [
        ("rpe", {"rpe": torch.zeros(4, 14)}),  # even length
        ("rpe", {"rpe": torch.zeros(2, 15)}),  # neither Hq nor 1 rows
        ("rpe", {"rpe": torch.zeros(15)}),
        ("rpe", {"rpe": torch.zeros(4, 13)}),  # L = 7 < 8
        ("rpe", {"rpe": torch.zeros(1, 15, dtype=torch.long)}),
        ("rpe", {"rpe": torch.full((1, 15), math.inf)}),
        ("num_features", {"num_features": 0}),
        ("seed", {"seed": -2}),
        ("block_size", {"block_size": 0}),
        ("projection", {"projection": torch.randn(16, 7)}),
    ]:
        assert_refused("kernel_rpe", argument, q, k, **kwargs)
    with pytest.raises(TypeError, match="feature_map"):
        attnzoo.attention(q, k, k, method="kernel_rpe", feature_map="softmax")
    with pytest.raises(ValueError, match="return_state"):
        attnzoo.attention(q, k, k, method="kernel_rpe", return_state=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature_map", ["performer", "elu"])
def test_kernel_rpe_trains_in_bfloat16(causal, feature_map):
    rpe = 0.5 * torch.randn(4, 199)
    assert_trains("kernel_rpe", causal=causal, feature_map=feature_map, rpe=rpe.bfloat16(), block_size=16)
