"""The chunked linear-attention core and the ``linear`` method: the three forms agree in float64
(outputs, final states, every gradient), decays never overflow, states continue sequences."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.kernels.linear import linear_attention
from attnzoo.kernels.linear_state import LinearState
from attnzoo.testing.helpers import assert_refused, assert_trains

KINDS = ("none", "constant", "scalar", "diagonal")


def _problem(kind, rule, normalize, seed=0, n=37, hq=4, h=2, dk=8, dv=6, extreme=False):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rand(2, hq, n, dk), rand(2, h, n, dk), rand(2, h, n, dv)
    if normalize:
        q, k = q.exp(), k.exp()
    if rule == "delta":
        k = F.normalize(k, dim=-1)
    g = None
    if kind == "constant":
        g = (torch.rand(1, h, 1, 1, generator=gen, dtype=torch.float64) * 0.5 + 0.5).log().expand(2, h, n, 1)
    elif kind in ("scalar", "diagonal"):
        g = F.logsigmoid(rand(2, h, n, 1 if kind == "scalar" else dk) + 2)
        if extreme:  # decays of e^-30 (a reset) next to decays of ~1
            g = torch.where(torch.rand(g.shape, generator=gen, dtype=torch.float64) < 0.2, -30.0, g * 1e-3)
    beta = torch.rand(2, h, n, generator=gen, dtype=torch.float64) * 2 if rule == "delta" else None
    s0 = LinearState(rand(2, h, dk, dv), rand(2, h, dk).exp() if normalize else None, 5)
    inputs = [
        t.clone().requires_grad_()
        for t in (q, k, v) + ((g,) if g is not None else ()) + ((beta,) if beta is not None else ())
    ]
    return inputs, s0, g is not None, beta is not None


def _run(form, inputs, has_g, has_beta, rule, normalize, s0, chunk):
    q, k, v = inputs[:3]
    g = inputs[3] if has_g else None
    beta = inputs[-1] if has_beta else None
    out, state = linear_attention(
        q, k, v, log_decay=g, beta=beta, rule=rule, normalize=normalize, initial_state=s0, form=form, chunk_size=chunk
    )
    loss = (out * out.cos()).sum() + state.state.square().sum()
    if state.normalizer is not None:
        loss = loss + state.normalizer.sin().sum()
    return [out.detach(), state.state.detach(), *torch.autograd.grad(loss, inputs)]


CONFIGS = [
    (kind, rule, normalize)
    for kind, rule, normalize in itertools.product(KINDS, ("add", "delta"), (False, True))
    if not (rule == "delta" and (normalize or kind == "diagonal"))
]


@pytest.mark.parametrize("kind,rule,normalize", CONFIGS)
@pytest.mark.parametrize("with_state", [False, True])
def test_three_forms_agree_in_float64(kind, rule, normalize, with_state):
    inputs, s0, has_g, has_beta = _problem(kind, rule, normalize)
    s0 = s0 if with_state else None
    gold = _run("recurrent", inputs, has_g, has_beta, rule, normalize, s0, 16)
    for form, chunk in (("parallel", 16), ("chunk", 16), ("chunk", 5), ("chunk", 64), ("chunk", 1)):
        found = _run(form, inputs, has_g, has_beta, rule, normalize, s0, chunk)
        for a, b in zip(found, gold):
            scale = max(1.0, b.abs().max().item())
            assert (a - b).abs().max().item() <= 1e-10 * scale, (form, chunk)


@pytest.mark.parametrize("kind", ["scalar", "diagonal"])
@pytest.mark.parametrize("rule", ["add", "delta"])
def test_extreme_decays_stay_finite_and_agree(kind, rule):
    if rule == "delta" and kind == "diagonal":
        pytest.skip("the delta rule takes scalar decays")
    inputs, _, has_g, has_beta = _problem(kind, rule, False, n=130, extreme=True)
    gold = _run("recurrent", inputs, has_g, has_beta, rule, False, None, 16)
    found = _run("chunk", inputs, has_g, has_beta, rule, False, None, 64)
    for a, b in zip(found, gold):
        assert a.isfinite().all()
        assert (a - b).abs().max().item() <= 1e-10 * max(1.0, b.abs().max().item())


def test_chunk_form_in_float32_has_no_positive_exponent_overflow():
    # log decays of -80 per token: a global cumulative sum would reach exp(+8000) in the intra-chunk factors
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    g = torch.full((1, 2, 256, 16), -80.0)
    out, state = linear_attention(q, k, v, log_decay=g, chunk_size=64)
    assert out.isfinite().all() and state.state.isfinite().all()
    # each token sees only itself (earlier tokens decayed by e^-80): o_i = (q_i . k_i e^0) v_i
    expected = (q * k).sum(-1, keepdim=True) * v
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_state_continues_a_sequence():
    q, k, v = (torch.randn(2, 4, 50, 8, dtype=torch.float64) for _ in range(3))
    full, final = attnzoo.attention(q, k, v, is_causal=True, method="linear", return_state=True)
    first, state = attnzoo.attention(
        q[:, :, :20], k[:, :, :20], v[:, :, :20], is_causal=True, method="linear", return_state=True
    )
    second, end = attnzoo.attention(
        q[:, :, 20:],
        k[:, :, 20:],
        v[:, :, 20:],
        is_causal=True,
        method="linear",
        return_state=True,
        initial_state=state,
    )
    torch.testing.assert_close(torch.cat([first, second], dim=2), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(end.state, final.state, rtol=0, atol=1e-12)
    assert end.length == final.length == 50 and end.size_bytes() == (2 * 4 * 8 * 8 + 2 * 4 * 8) * 8


def test_linear_matches_the_definition():
    q, k, v = (torch.randn(1, 2, 30, 8, dtype=torch.float64) for _ in range(3))
    for causal in (True, False):
        phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
        weights = phi_q @ phi_k.mT
        if causal:
            weights = weights.tril()
        expected = (weights @ v) / weights.sum(-1, keepdim=True)
        for backend in ("reference", "chunk", "parallel"):
            found = attnzoo.attention(q, k, v, is_causal=causal, method="linear", backend=backend)
            torch.testing.assert_close(found, expected, rtol=0, atol=1e-12)


def test_padded_keys_write_nothing_and_unnormalised_scale():
    q, k, v = (torch.randn(2, 2, 20, 8, dtype=torch.float64) for _ in range(3))
    kv_mask = torch.ones(2, 20, dtype=torch.bool)
    kv_mask[1, 12:] = False
    out = attnzoo.attention(
        q, k, v, method="linear", kv_mask=kv_mask, feature_map="identity", normalize=False, scale=0.5
    )
    expected = 0.5 * q @ (k[:, :, :, :, None] * v[:, :, :, None, :] * kv_mask[:, None, :, None, None]).sum(2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_no_visible_key_gives_zero_rows():
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    out = attnzoo.attention(q, k, v, method="linear", kv_mask=torch.zeros(1, 10, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))
    # more queries than keys, causal: the first rows see nothing
    out = attnzoo.attention(q, k[:, :, :4], v[:, :, :4], is_causal=True, method="linear")
    assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6])) and out[:, :, 6:].abs().sum() > 0


def test_linear_trains_in_bf16():
    assert_trains("linear")
    assert_trains("linear", causal=False, feature_map="relu", chunk_size=16)


@pytest.mark.parametrize(
    "argument,kwargs",
    [
        ("feature_map", {"feature_map": "cosine"}),
        ("normalize", {"feature_map": "identity", "normalize": True}),
        ("chunk_size", {"chunk_size": 0}),
        ("initial_state", {"initial_state": torch.zeros(2, 2, 8, 8)}),
    ],
)
def test_bad_parameters_are_refused(argument, kwargs):
    q = torch.randn(2, 2, 16, 8)
    if argument in ("initial_state", "feature_map"):  # a value of the wrong type
        with pytest.raises(TypeError, match=argument):
            attnzoo.attention(q, q, q, method="linear", **kwargs)
        return
    assert_refused("linear", argument, q, **kwargs)


@pytest.mark.parametrize(
    "state,needle",
    [
        (LinearState(torch.zeros(2, 2, 8, 7), torch.zeros(2, 2, 8)), "shape"),
        (LinearState(torch.zeros(2, 2, 8, 8, dtype=torch.float64), torch.zeros(2, 2, 8)), "float32"),
        (LinearState(torch.zeros(2, 2, 8, 8)), "normalizer"),
        (LinearState(torch.zeros(2, 2, 8, 8), torch.zeros(2, 8)), "normalizer"),
        (LinearState(torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8), -1), "length"),
    ],
)
def test_bad_states_are_refused(state, needle):
    q = torch.randn(2, 2, 16, 8)
    message = assert_refused("linear", "initial_state", q, is_causal=True, initial_state=state)
    assert needle in message


def test_core_refuses_combinations_it_does_not_define():
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="normalize"):
        linear_attention(q, q, q, rule="delta", normalize=True)
    with pytest.raises(ValueError, match="is_causal"):
        linear_attention(q, q, q, causal=False, log_decay=torch.zeros(1, 1, 4, 1))
    with pytest.raises(ValueError, match="log_decay"):
        linear_attention(q, q, q, rule="delta", log_decay=torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="form"):
        linear_attention(q, q, q, form="fast")


def test_decoding_continues_after_a_prefill():
    q, k, v = (torch.randn(1, 2, 30, 8, dtype=torch.float64) for _ in range(3))
    full = attnzoo.attention(q, k, v, is_causal=True, method="linear")
    _, prefill = attnzoo.attention(
        q[:, :, :25], k[:, :, :25], v[:, :, :25], is_causal=True, method="linear", return_state=True
    )
    state = attnzoo.init_state("linear", batch=1, kv_heads=2, head_dim=8, dtype=torch.float64, initial_state=prefill)
    assert state.length == 25
    out, state = attnzoo.step(q[:, :, 25:], k[:, :, 25:], v[:, :, 25:], state)
    torch.testing.assert_close(out, full[:, :, 25:], rtol=0, atol=1e-12)
    assert state.length == 30 and state.inner.length == 30


@pytest.mark.parametrize("kind", ["none", "diagonal"])
def test_head_slabs_equal_one_pass(monkeypatch, kind):
    """Large inputs run the chunk form on slabs of heads; the result is the same."""
    inputs, s0, has_g, has_beta = _problem(kind, "add", kind == "none", n=40)
    gold = _run("chunk", inputs, has_g, has_beta, "add", kind == "none", s0, 16)
    monkeypatch.setattr("attnzoo.kernels.linear.SLAB_BYTES", 1)  # one key/value head per slab
    found = _run("chunk", inputs, has_g, has_beta, "add", kind == "none", s0, 16)
    for a, b in zip(found, gold):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
