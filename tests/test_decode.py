"""init_state / step: token-by-token decoding."""

import importlib

import pytest
import torch

import attnzoo


def _state(**kwargs):
    return attnzoo.init_state("dense", batch=1, kv_heads=2, head_dim=8, **kwargs)


def test_step_grows_the_state_and_matches_full_attention():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    state = _state()
    assert state.size_bytes() == 0 and state.length == 0
    out, state = attnzoo.step(q[:, :, :4], k[:, :, :4], v[:, :, :4], state)
    assert state.length == 4 and state.size_bytes() == 2 * 4 * 2 * 8 * 4
    last, state = attnzoo.step(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], state)
    torch.testing.assert_close(torch.cat([out, last], 2), attnzoo.attention(q, k, v, is_causal=True))


@pytest.mark.parametrize(
    "kwargs,argument",
    [({"batch": 0}, "batch"), ({"head_dim": -1}, "head_dim"), ({"bogus": 1}, "bogus")],
)
def test_init_state_refuses_bad_arguments(kwargs, argument):
    base = {"batch": 1, "kv_heads": 2, "head_dim": 8}
    with pytest.raises(ValueError, match=argument):
        attnzoo.init_state("dense", **{**base, **kwargs})


def test_step_refuses_mismatched_tokens_and_states():
    state = _state()
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="same new tokens"):
        attnzoo.step(q, q[:, :, :2], q[:, :, :2], state)
    with pytest.raises(ValueError, match="key"):
        attnzoo.step(q, q[..., :4], q, state)
    with pytest.raises(ValueError, match="key"):
        attnzoo.step(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8), state)
    with pytest.raises(ValueError, match="key"):
        attnzoo.step(q.double(), q.double(), q.double(), state)
    with pytest.raises(TypeError, match="state"):
        attnzoo.step(q, q, q, {"key": q})


def test_step_dispatches_like_attention(monkeypatch):
    dense = importlib.import_module("attnzoo.methods.dense")
    from attnzoo.kernels import sdpa as sdpa_kernel

    monkeypatch.setattr(sdpa_kernel, "DENSE_MASK_LIMIT_BYTES", 100)  # sdpa declines; tiled must run
    tiled_calls = []
    original = dense.tiled_attention
    monkeypatch.setattr(dense, "tiled_attention", lambda *a, **kw: tiled_calls.append(1) or original(*a, **kw))
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    state = _state()
    first, state = attnzoo.step(q[:, :, :5], k[:, :, :5], v[:, :, :5], state)
    rest, state = attnzoo.step(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], state)
    assert tiled_calls, "the step with a cache built the dense mask instead of dispatching to tiled"
    torch.testing.assert_close(torch.cat([first, rest], 2), attnzoo.attention(q, k, v, is_causal=True, backend="tiled"))
