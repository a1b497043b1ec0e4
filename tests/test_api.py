"""attention() as a drop-in for SDPA, its extensions, dispatch and explain()."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import attnzoo
from attnzoo.kernels import sdpa as sdpa_kernel


def random_qkv(B=2, H=4, Nq=33, Nk=33, D=16, Hkv=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Hkv = Hkv or H
    q = torch.randn(B, H, Nq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    return q, k, v


SHARED_ARGUMENTS = [
    {},
    {"is_causal": True},
    {"scale": 0.3},
    {"attn_mask": torch.rand(2, 1, 33, 33, generator=torch.Generator().manual_seed(1)) < 0.8},
    {"attn_mask": torch.randn(33, 33)},
    {"is_causal": True, "scale": 2.0},
]


@pytest.mark.parametrize("kwargs", SHARED_ARGUMENTS, ids=lambda kw: ",".join(kw) or "plain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_equals_sdpa_bitwise(kwargs, dtype):
    q, k, v = random_qkv(dtype=dtype)
    kwargs = {
        n: (a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a) for n, a in kwargs.items()
    }
    assert torch.equal(attnzoo.attention(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs))


def test_equals_sdpa_with_gqa_and_dropout():
    q, k, v = random_qkv(Hkv=2)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.equal(attnzoo.attention(q, k, v, enable_gqa=True), expected)
    assert torch.equal(attnzoo.attention(q, k, v), expected)
    torch.manual_seed(7)
    dropped = attnzoo.attention(q, k, v, dropout_p=0.3, enable_gqa=True)
    torch.manual_seed(7)
    assert torch.equal(dropped, F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True))
    assert not torch.equal(dropped, expected)


def test_causal_cross_attention_is_bottom_right_aligned():
    q, k, v = random_qkv(Nq=5, Nk=40)
    out = attnzoo.attention(q, k, v, is_causal=True)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 40))
    torch.testing.assert_close(out, expected)
    # The last query sees every key, as in KV-cache decoding.
    torch.testing.assert_close(out[:, :, -1], F.scaled_dot_product_attention(q[:, :, -1:], k, v)[:, :, 0])


def test_more_queries_than_keys_gives_zero_rows_not_nan():
    q, k, v = random_qkv(Nq=10, Nk=4)
    for backend in ["sdpa", "tiled", "reference"]:
        out, lse = attnzoo.attention(q, k, v, is_causal=True, backend=backend, return_lse=True)
        assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6])), backend
        assert torch.isneginf(lse[:, :, :6]).all() and torch.isfinite(lse[:, :, 6:]).all(), backend


@pytest.mark.parametrize("left", [False, True])
def test_padding_mask_equals_explicit_mask(left):
    q, k, v = random_qkv(B=3)
    lengths = torch.tensor([33, 20, 0])
    positions = torch.arange(33)
    kv_mask = positions >= 33 - lengths[:, None] if left else positions < lengths[:, None]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_mask[:, None, None, :])
    for backend in ["sdpa", "tiled"]:
        out = attnzoo.attention(q, k, v, kv_mask=kv_mask, backend=backend)
        torch.testing.assert_close(out, expected)
        assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_causal_with_attn_mask_is_allowed_unlike_sdpa():
    q, k, v = random_qkv()
    mask = torch.rand(33, 33, generator=torch.Generator().manual_seed(3)) < 0.5
    out = attnzoo.attention(q, k, v, attn_mask=mask, is_causal=True)
    combined = mask & torch.ones(33, 33, dtype=torch.bool).tril()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=combined))


@pytest.mark.parametrize("backend", ["sdpa", "tiled", "reference"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_zero_scale_causal_is_a_running_mean_not_nan(backend, return_lse):
    # SDPA's CPU flash kernel returns NaN for is_causal=True with scale=0.0; attnzoo must not.
    q, k, v = random_qkv(Nq=6, Nk=6, dtype=torch.float64)
    result = attnzoo.attention(q, k, v, is_causal=True, scale=0.0, backend=backend, return_lse=return_lse)
    out = result[0] if return_lse else result
    running_mean = v.cumsum(2) / torch.arange(1, 7, dtype=torch.float64)[:, None]
    torch.testing.assert_close(out, running_mean)


def test_return_forms():
    q, k, v = random_qkv()
    assert isinstance(attnzoo.attention(q, k, v), torch.Tensor)
    out, lse = attnzoo.attention(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    _, lse64 = attnzoo.attention(q.double(), k.double(), v.double(), return_lse=True)
    assert lse64.dtype == torch.float64
    _, lse16 = attnzoo.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), return_lse=True)
    assert lse16.dtype == torch.float32


def test_value_head_size_may_differ():
    q, k, _ = random_qkv()
    v = torch.randn(2, 4, 33, 24)
    expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(attnzoo.attention(q, k, v), expected)
    out, _ = attnzoo.attention(q, k, v, return_lse=True)  # sdpa refuses, tiled runs
    torch.testing.assert_close(out, expected)
    assert "value head size" in str(attnzoo.explain(q, k, v, return_lse=True))


def test_dispatch_moves_on_when_sdpa_would_build_a_large_mask(monkeypatch):
    q, k, v = random_qkv(Nq=17, Nk=33)
    assert attnzoo.explain(q, k, v, is_causal=True).chosen == "sdpa"
    monkeypatch.setattr(sdpa_kernel, "DENSE_MASK_LIMIT_BYTES", 100)
    explanation = attnzoo.explain(q, k, v, is_causal=True)
    assert explanation.chosen == "tiled" and "dense mask" in " ".join(explanation.reasons["sdpa"])
    assert "sdpa" in str(explanation) and "tiled: runs" in str(explanation)
    with pytest.raises(attnzoo.NoBackendError, match="dense mask"):
        attnzoo.attention(q, k, v, is_causal=True, backend="sdpa")


def test_no_backend_error_lists_every_reason(monkeypatch):
    q, k, v = random_qkv(Nq=17, Nk=33)
    monkeypatch.setattr(sdpa_kernel, "DENSE_MASK_LIMIT_BYTES", 100)
    with pytest.raises(attnzoo.NoBackendError) as info:
        attnzoo.attention(q, k, v, is_causal=True, dropout_p=0.1)
    message = str(info.value)
    assert "sdpa:" in message and "tiled:" in message and "dropout" in message and "reference" in message


def test_forced_reference_backend_matches():
    q, k, v = random_qkv(dtype=torch.float64)
    torch.testing.assert_close(
        attnzoo.attention(q, k, v, is_causal=True, backend="reference"),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
    )


def test_forced_reference_refuses_dropout_instead_of_ignoring_it():
    q, k, v = random_qkv()
    with pytest.raises(attnzoo.NoBackendError, match="dropout"):
        attnzoo.attention(q, k, v, dropout_p=0.2, backend="reference")


def test_non_contiguous_inputs():
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in random_qkv())
    assert not q.is_contiguous()
    expected = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    for backend in ["sdpa", "tiled"]:
        torch.testing.assert_close(attnzoo.attention(q, k, v, backend=backend), expected)


def test_tiled_block_sizes_do_not_change_the_result():
    from attnzoo.kernels.tiled import tiled_attention

    q, k, v = random_qkv(Nq=70, Nk=70, dtype=torch.float64)
    expected, expected_lse = tiled_attention(q, k, v, scale=0.25, is_causal=True)
    for q_block, kv_block in [(1, 1), (7, 13), (64, 5), (128, 128)]:
        out, lse = tiled_attention(q, k, v, scale=0.25, is_causal=True, q_block=q_block, kv_block=kv_block)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(lse, expected_lse)


@pytest.mark.parametrize("shape", [(2, 1, 1, 70), (1, 4, 70, 1), (70, 70), (2, 4, 70, 70), (1, 1, 1, 1)])
@pytest.mark.parametrize("boolean", [True, False])
def test_tiled_broadcast_masks_across_many_tiles(shape, boolean):
    from attnzoo.kernels.tiled import tiled_attention

    q, k, v = random_qkv(Nq=70, Nk=70, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(shape, generator=gen) < 0.8 if boolean else torch.randn(shape, generator=gen, dtype=torch.float64)
    while mask.dim() < 4:
        mask = mask[None]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    kwargs = {"mask": mask} if boolean else {"bias": mask}
    out, _ = tiled_attention(q, k, v, scale=0.25, q_block=16, kv_block=9, **kwargs)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25))
    torch.testing.assert_close(attnzoo.attention(q, k, v, attn_mask=mask, backend="tiled"), expected)


def test_methods_listing():
    listed = attnzoo.methods()
    names = [m.name for m in listed]
    assert names[0] == "dense" and {"sliding_window", "neighborhood", "blocked_local", "window"} <= set(names)
    assert listed[0].family == "exact" and listed[0].capabilities.lse
    assert [m.family for m in listed] == sorted((m.family for m in listed), key=attnzoo.registry.FAMILIES.index)
    assert {m.name for m in attnzoo.methods(family="local")} == {
        "sliding_window",
        "neighborhood",
        "blocked_local",
        "window",
    }
    with pytest.raises(ValueError, match="family"):
        attnzoo.methods(family="nope")
