"""sigmoid: the definition by a naive float64 loop, the blocked kernel against the reference
(forward and backward, every mask, partial blocks), its memory, the default bias, decoding, bad
parameters and low-precision training."""

import math

import pytest
import torch

import attnzoo
from attnzoo.methods import sigmoid
from attnzoo.testing.helpers import LargestAllocation, assert_refused, assert_trains

SETTINGS = [  # (Nq, Nk, q_heads, kv_heads, causal, masks)
    (13, 13, 2, 2, True, ""),
    (13, 13, 4, 2, False, "kv"),
    (9, 20, 4, 1, True, "kv+bool"),
    (20, 9, 2, 2, True, "float"),
    (20, 9, 2, 1, False, "bool+float"),
    (1, 1, 2, 2, True, ""),
]


def make(nq, nk, hq, hkv, causal, masks, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, nq, 8, generator=gen, dtype=dtype)
    k = torch.randn(2, hkv, nk, 8, generator=gen, dtype=dtype)
    v = torch.randn(2, hkv, nk, 5, generator=gen, dtype=dtype)
    kwargs = {"is_causal": causal}
    if "kv" in masks:
        kwargs["kv_mask"] = torch.stack([torch.arange(nk) >= nk // 3, torch.arange(nk) < nk - 2])
    if "bool" in masks:
        kwargs["attn_mask"] = torch.rand(2, 1, nq, nk, generator=gen) < 0.7
    if "float" in masks:
        kwargs["attn_mask"] = torch.randn(1, hq, nq, nk, generator=gen, dtype=dtype)
    if masks == "bool+float":  # a float mask broadcast over queries, hiding nothing
        kwargs["attn_mask"] = torch.randn(2, 1, 1, nk, generator=gen, dtype=dtype)
    return q, k, v, kwargs


def naive(q, k, v, kwargs, b, scale):
    """o_i = sum over visible j of sigmoid(q_i . k_j * scale + b + mask_ij) v_j, by loops in float64."""
    B, hq, nq, _ = q.shape
    nk, g = k.shape[2], hq // k.shape[1]
    kv_mask, mask = kwargs.get("kv_mask"), kwargs.get("attn_mask")
    out = torch.zeros(B, hq, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(B):
        for h in range(hq):
            for i in range(nq):
                for j in range(nk):
                    if kwargs["is_causal"] and j > i + nk - nq:
                        continue
                    if kv_mask is not None and not kv_mask[bi, j]:
                        continue
                    logit = float(q[bi, h, i] @ k[bi, h // g, j]) * scale + b
                    if mask is not None:
                        m = mask[min(bi, mask.shape[0] - 1), min(h, mask.shape[1] - 1)]
                        m = m[min(i, m.shape[0] - 1), j]
                        if mask.dtype == torch.bool and not m:
                            continue
                        logit += 0.0 if mask.dtype == torch.bool else float(m)
                    out[bi, h, i] += v[bi, h // g, j] / (1.0 + math.exp(-logit))
    return out


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_matches_the_naive_definition(setting):
    q, k, v, kwargs = make(*setting)
    expected = naive(q, k, v, kwargs, -1.5, 0.4)
    for backend in ("blocked", "reference"):
        out = attnzoo.attention(q, k, v, scale=0.4, method="sigmoid", backend=backend, bias=-1.5, **kwargs)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    for q_block in (1, 4, 7):  # partial blocks, causal blocks that see no key
        mask = kwargs.get("attn_mask")
        out = sigmoid.sigmoid_attention(
            q, k, v, scale=0.4, bias=-1.5, is_causal=kwargs["is_causal"], kv_mask=kwargs.get("kv_mask"),
            mask=mask if mask is not None and mask.dtype == torch.bool else None,
            attn_bias=mask if mask is not None and mask.dtype != torch.bool else None, q_block=q_block,
        )  # fmt: skip
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("setting", SETTINGS[:5], ids=str)
@pytest.mark.parametrize("q_block", [3, 128])
def test_blocked_gradients_match_autograd_of_the_reference(setting, q_block):
    q, k, v, kwargs = make(*setting)
    mask = kwargs.pop("attn_mask", None)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.clone().requires_grad_()  # a learned float bias gets its gradient too
    grads = []
    for run in ("blocked", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        masks = {} if mask is None else {"attn_mask": mask}
        if run == "blocked":
            out = sigmoid.sigmoid_attention(
                *leaves, scale=0.3, bias=-1.0, is_causal=kwargs["is_causal"], kv_mask=kwargs.get("kv_mask"),
                mask=mask if mask is not None and mask.dtype == torch.bool else None,
                attn_bias=mask if mask is not None and mask.dtype != torch.bool else None, q_block=q_block,
            )  # fmt: skip
        else:
            out = attnzoo.attention(*leaves, scale=0.3, method="sigmoid", backend="reference", bias=-1.0,
                                    **kwargs, **masks)  # fmt: skip
        inputs = leaves + ([mask] if mask is not None and mask.requires_grad else [])
        grads.append(torch.autograd.grad(out.sin().sum(), inputs))
    for found, expected in zip(*grads):
        torch.testing.assert_close(found, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_blocked_matches_the_reference_in_float32_at_n_1000(causal):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 1000, 16, generator=gen)
    k, v = (torch.randn(1, 2, 1000, 16, generator=gen) for _ in range(2))
    grad = torch.randn(1, 4, 1000, 16, generator=gen)
    results = {}
    for name, dtype, backend in (("gold", torch.float64, "reference"), ("ref", torch.float32, "reference"),
                                 ("fast", torch.float32, "blocked")):  # fmt: skip
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = attnzoo.attention(*leaves, is_causal=causal, method="sigmoid", backend=backend, bias=-3.0)
        results[name] = [out.double(), *torch.autograd.grad((out * grad.to(dtype)).sum(), leaves)]
    for fast, ref, gold in zip(results["fast"], results["ref"], results["gold"]):
        err, ref_err = (fast - gold).abs().max().item(), (ref - gold).abs().max().item()
        assert err <= max(2e-6 * gold.abs().max().item(), 4 * ref_err), (err, ref_err)


@pytest.mark.parametrize("causal", [True, False])
def test_blocked_keeps_only_q_k_v_and_one_block_of_weights(causal):
    n = 2048
    q, k, v = (torch.randn(1, 1, n, 16, requires_grad=True) for _ in range(3))
    tracker = LargestAllocation()
    with tracker:
        out = attnzoo.attention(q, k, v, is_causal=causal, method="sigmoid", bias=-2.0)
        saved = out.grad_fn.saved_tensors  # the autograd Function saves the inputs and nothing else
        out.square().sum().backward()
    assert [tuple(t.shape) for t in saved if t is not None] == [(1, 1, n, 16)] * 3
    assert q.grad is not None and tracker.largest > 0
    assert tracker.largest <= sigmoid.Q_BLOCK * n, tracker.largest  # one block of weights, never N x N


def test_default_bias_is_minus_log_of_the_number_of_keys():
    q, k, v, kwargs = make(9, 20, 2, 2, True, "kv")
    assert sigmoid.SigmoidParams().bias is None
    found = attnzoo.attention(q, k, v, method="sigmoid", **kwargs)
    torch.testing.assert_close(found, naive(q, k, v, kwargs, -math.log(20), 1 / math.sqrt(8)), rtol=0, atol=1e-12)
    explicit = attnzoo.attention(q, k, v, method="sigmoid", bias=-math.log(20), **kwargs)
    torch.testing.assert_close(found, explicit, rtol=0, atol=0)


def test_decode_with_a_fixed_bias_equals_the_full_sequence():
    q, k, v, _ = make(40, 40, 4, 2, True, "")
    full = attnzoo.attention(q, k, v, is_causal=True, method="sigmoid", bias=-2.5)
    state = attnzoo.init_state("sigmoid", batch=2, kv_heads=2, head_dim=8, value_dim=5, dtype=torch.float64,
                               bias=-2.5)  # fmt: skip
    outs, start = [], 0
    for n in (1, 1, 9, 1, 28):
        sl = slice(start, start + n)
        out, state = attnzoo.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state)
        outs.append(out)
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=0, atol=1e-12)
    assert state.length == 40 and state.size_bytes() == (40 * 8 + 40 * 5) * 2 * 2 * 8
    with pytest.raises(ValueError, match="bias"):
        attnzoo.init_state("sigmoid", batch=2, kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="key"):
        attnzoo.step(q[:, :, :1], k[:, :1, :1], v[:, :1, :1], state)


@pytest.mark.parametrize("bad,argument", [(math.nan, "bias"), (math.inf, "bias"), (-math.inf, "bias")])
def test_bad_parameters_are_refused(bad, argument):
    q = torch.randn(2, 2, 16, 8)
    assert_refused("sigmoid", argument, q, bias=bad)
    with pytest.raises(ValueError, match="q_block"):
        sigmoid.sigmoid_attention(q, q, q, scale=1.0, bias=0.0, q_block=0)


@pytest.mark.parametrize("causal", [True, False])
def test_trains_in_bfloat16(causal):
    assert_trains("sigmoid", causal=causal, n=300, bias=-2.0)
    out = assert_trains("sigmoid", causal=causal, n=100, kv_heads=1, dtype=torch.float16)
    assert out.dtype == torch.float16


def test_registration_documents_the_choices():
    spec = attnzoo.get_method("sigmoid")
    assert spec.family == "exact" and not spec.exact and not spec.capabilities.lse
    assert all(p.get("bias") is not None for p in spec.test_params)  # decode checks need a fixed bias
