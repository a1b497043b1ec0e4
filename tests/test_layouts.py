"""Every method takes non-contiguous inputs: models (transformers among them) hand over query,
key and value as ``[B, N, H, D]`` tensors transposed to ``[B, H, N, D]``."""

import pytest
import torch

import attnzoo
from attnzoo.arena.common import run_params


@pytest.mark.parametrize("name", [m.name for m in attnzoo.methods()])
def test_transposed_inputs_equal_contiguous(name):
    spec = attnzoo.get_method(name)
    causal = spec.capabilities.causal
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 96, heads, 16, generator=g, dtype=torch.float64) for heads in (4, 2, 2))
    if spec.shared_query:
        q = q[:, :1].expand_as(q)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, N, D] views, not contiguous
    assert not q.is_contiguous()
    params = run_params(spec, q.contiguous(), k.contiguous(), v.contiguous(), causal, 24, 0)
    expected = attnzoo.attention(
        q.contiguous(), k.contiguous(), v.contiguous(), is_causal=causal, method=name, **params
    )
    got = attnzoo.attention(q, k, v, is_causal=causal, method=name, **params)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
