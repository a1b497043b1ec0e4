"""The local methods on an accelerator (skipped without one): the device-agnostic tile path
(matmul/softmax, no CPU flash kernel) against the dense reference on the same device."""

import pytest
import torch

import attnzoo

CUDA = torch.cuda.is_available()

CASES = [
    ("sliding_window", (2, 4, 2, 300, 32), {"window": (40, 7), "sinks": 3}, True),
    ("sliding_window", (2, 4, 1, 257, 32), {"window": (16, 0), "dilation": 2}, True),
    ("neighborhood", (2, 4, 2, 17, 19, 32), {"kernel_size": (5, 3), "dilation": (2, 1), "stride": (1, 2)}, False),
    ("neighborhood", (1, 2, 2, 6, 7, 8, 16), {"kernel_size": 3}, True),
    ("blocked_local", (2, 2, 2, 16, 16, 32), {"block_size": 4, "halo": 2}, False),
    ("window", (2, 2, 2, 14, 14, 32), {"window_size": 7, "shift": 3}, False),
]


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,dims,params,causal", CASES, ids=[c[0] + str(i) for i, c in enumerate(CASES)])
def test_matches_the_reference_on_cuda(method, dims, params, causal, dtype):
    B, Hq, Hkv, *spatial, D = dims
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, *spatial, D, device="cuda", generator=gen)
    k, v = (torch.randn(B, Hkv, *spatial, D, device="cuda", generator=gen) for _ in range(2))
    n = q[0, 0, ..., 0].numel()
    kv_mask = torch.rand(B, n, device="cuda", generator=gen) < 0.8
    kwargs = dict(is_causal=causal, method=method, kv_mask=kv_mask, return_lse=True, **params)
    gold = [t.double().requires_grad_() for t in (q, k, v)]
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    ref_low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    grad = torch.randn((*q.shape[:-1], D), device="cuda", generator=gen)
    outs = {}
    for name, inputs, backend in (("gold", gold, "reference"), ("fast", low, None), ("ref", ref_low, "reference")):
        out, lse = attnzoo.attention(*inputs, backend=backend, **kwargs)
        (out.double() * grad.double()).sum().backward()
        outs[name] = (out.double(), lse.double(), [t.grad.double() for t in inputs])
    assert outs["fast"][0].device.type == "cuda"
    for i in range(2):  # output, lse: within 2x the reference's own low-precision error (or a floor)
        floor = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
        fin = torch.isfinite(outs["gold"][i])
        err = (outs["fast"][i] - outs["gold"][i])[fin].abs().max().item()
        ref_err = (outs["ref"][i] - outs["gold"][i])[fin].abs().max().item()
        assert err <= max(floor, 2 * ref_err), (i, err, ref_err)
    for g_fast, g_ref, g_gold in zip(outs["fast"][2], outs["ref"][2], outs["gold"][2]):
        floor = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-1}[dtype]
        err, ref_err = (g_fast - g_gold).abs().max().item(), (g_ref - g_gold).abs().max().item()
        assert err <= max(floor, 4 * ref_err), (err, ref_err)
