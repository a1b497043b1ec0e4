"""``Method.rows_independent`` is a claim callers rely on (model integrations decode by padding
the earlier queries): check it both ways for every causal method, at a budget that makes the
sparse methods actually select."""

import pytest
import torch

import attnzoo
from attnzoo.arena.common import run_params

N = 512


def _inputs(spec):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 32, generator=g, dtype=torch.float64) for _ in range(3))
    if spec.shared_query:
        q = q[:, :, :1].expand_as(q).contiguous()
    return q, k, v, g


@pytest.mark.parametrize("name", [m.name for m in attnzoo.methods() if m.capabilities.causal])
def test_rows_independent_claim(name):
    spec = attnzoo.get_method(name)
    if spec.shared_query:
        assert not spec.rows_independent
        return
    q, k, v, g = _inputs(spec)
    params = run_params(spec, q, k, v, True, 64, 0)
    out = attnzoo.attention(q, k, v, is_causal=True, method=name, **params)
    worst = 0.0
    for row in (N - 1, N - 37, 300):
        other = torch.randn(q.shape, generator=g, dtype=q.dtype)
        other[:, :, row] = q[:, :, row]
        moved = attnzoo.attention(other, k, v, is_causal=True, method=name, **params)
        worst = max(worst, (moved[:, :, row] - out[:, :, row]).abs().max().item())
    if spec.rows_independent:
        assert worst <= 1e-12, f"{name} claims independent rows but a row moved by {worst:.2e}"
    else:
        assert worst > 1e-6, f"{name} is marked as mixing queries but no row moved"
